"""The README's main job, small: 2 documents answered by 2 Ray CPU actors with Quest."""

import re

import pytest

from longquest.launch.cli import main


@pytest.mark.slow
def test_demo_prints_answers_accuracy_pages_and_time(capsys):
    code = main(["demo", "--trials", "2", "--context", "800", "--budget", "64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Quest budget 64 tokens in pages of 4, 2 ray worker(s)" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+0\.\d\d\s+\d+\s+\d{5}", line)]
    assert len(rows) == 2, out
    summary = re.search(r"accuracy (\d)/2; .* (\d+) of (\d+) \(\d+%\); .*total [\d.]+ s", out)
    assert summary, out
    attended, total = int(summary.group(2)), int(summary.group(3))
    assert attended <= 64 // 4 < total  # the budget held and selection happened
