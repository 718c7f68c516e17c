"""The package's shape rules (STYLE.md), checked on the source with ``ast``: file and
function sizes, the kernels boundary, no private names across modules, and process-level
inputs (ray, argv, environment) read only in ``longquest/launch``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "longquest"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80

# Triton kernel bodies that may run longer: each value says why.
LONG_FUNCTIONS = {
    ("kernels/decode.py", "_decode_kernel"): "one kernel body; splitting it into jit helpers "
    "costs registers in the split-K loop",
    ("kernels/topk_spread.py", "_spread_select_kernel"): "one kernel body; its programs "
    "poll shared histograms, and splitting costs registers",
}

# Modules outside longquest/launch that may touch ray, argv or the environment: each value
# says why. (None today.)
PROCESS_INPUT_EXCEPTIONS: dict[str, str] = {}


def _modules() -> list[tuple[str, ast.Module, str]]:
    """``(path relative to the package, tree, source)`` of every module of the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        out.append((path.relative_to(PACKAGE).as_posix(), ast.parse(source), source))
    return out


MODULES = _modules()


def _module_name(relative: str) -> str:
    parts = ["longquest", *relative.removesuffix(".py").split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` of every absolute import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
    return found


def test_every_package_is_checked():
    names = {relative for relative, _, _ in MODULES}
    packages = ("engine", "kernels", "launch", "parallel")
    assert len(names) > 30 and all(f"{package}/__init__.py" in names for package in packages)


SOURCES = {relative: source for relative, _, source in MODULES}


@pytest.mark.parametrize("relative", sorted(SOURCES))
def test_file_size(relative):
    lines = SOURCES[relative].count("\n")
    assert lines <= MAX_FILE_LINES, (
        f"longquest/{relative} has {lines} lines (at most {MAX_FILE_LINES}): split it along "
        "its seam"
    )


def test_function_sizes():
    long = []
    for relative, tree, _ in MODULES:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (relative, node.name) not in LONG_FUNCTIONS:
                    long.append(f"longquest/{relative}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_long_function_allow_list_is_current():
    """An allowed function that is gone or short again leaves the list."""
    present = {}
    for relative, tree, _ in MODULES:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                present[(relative, node.name)] = node.end_lineno - node.lineno + 1
    stale = [key for key in LONG_FUNCTIONS if present.get(key, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines: drop {stale}"


def test_no_private_names_across_modules():
    wrong = []
    for relative, tree, _ in MODULES:
        for module, names, line in _imports(tree):
            if not module.startswith("longquest") or module == _module_name(relative):
                continue
            for name in names:
                if name.startswith("_") and not name.endswith("__"):  # dunders are public
                    wrong.append(f"longquest/{relative}:{line} imports {name} from {module}")
    assert not wrong, f"private names imported from other modules: {wrong}"


def test_engine_and_parallel_use_the_kernels_package_only():
    wrong = []
    for relative, tree, _ in MODULES:
        if not relative.startswith(("engine/", "parallel/")):
            continue
        for module, _, line in _imports(tree):
            if module.startswith("longquest.kernels."):
                wrong.append(f"longquest/{relative}:{line} imports {module}")
    assert not wrong, f"import from longquest.kernels, not its submodules: {wrong}"


def _process_inputs(tree: ast.Module) -> list[tuple[int, str]]:
    """Lines that import ray or read ``sys.argv`` / ``os.environ`` / ``os.getenv``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ray"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "ray":
                found.append((node.lineno, node.module))
            if node.module in ("os", "sys"):
                names = {a.name for a in node.names} & {"environ", "getenv", "argv"}
                found += [(node.lineno, f"{node.module}.{name}") for name in sorted(names)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in (("sys", "argv"), ("os", "environ"), ("os", "getenv")):
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_only_launch_reads_ray_argv_and_environment():
    wrong = []
    for relative, tree, _ in MODULES:
        if relative.startswith("launch/") or relative in PROCESS_INPUT_EXCEPTIONS:
            continue
        wrong += [f"longquest/{relative}:{line} {what}" for line, what in _process_inputs(tree)]
    assert not wrong, f"only longquest/launch may import ray or read argv/environ: {wrong}"


def test_the_checks_see_what_they_forbid():
    """Each rule's finder catches a sample of what it forbids."""
    sample = ast.parse(
        "import os, sys\nimport ray\nfrom os import environ\nx = sys.argv\ny = os.getenv('A')\n"
        "from longquest.kernels.scores import _score_blocks\n"
    )
    assert [what for _, what in _process_inputs(sample)] == [
        "ray", "os.environ", "sys.argv", "os.getenv",
    ]  # fmt: skip
    assert ("longquest.kernels.scores", ["_score_blocks"], 6) in _imports(sample)
