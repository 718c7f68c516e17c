"""Page keys of the prefix cache: a chain over full pages, salted, the same in every process."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from longquest.engine.page_keys import cache_salt, page_keys, page_tokens

SALT = cache_salt(model="tiny", dtype="float32", page_size=4, bounds_dtype=None, world_size=1)


def test_only_full_pages_have_keys():
    assert len(page_keys(list(range(10)), page_size=4, salt=SALT)) == 2
    assert len(page_keys(list(range(12)), page_size=4, salt=SALT)) == 3
    assert page_keys([5, 6, 7], page_size=4, salt=SALT) == []
    assert all(len(k) == 32 for k in page_keys(list(range(40)), page_size=8, salt=SALT))


def test_a_key_covers_every_token_before_its_page_end():
    rng = random.Random(0)
    tokens = [rng.randrange(3, 1000) for _ in range(40)]
    keys = page_keys(tokens, page_size=4, salt=SALT)
    # A prefix's keys are the prefix of the keys; a longer tail changes nothing before it.
    assert page_keys(tokens[:22], page_size=4, salt=SALT) == keys[:5]
    assert page_keys(tokens + [1, 2, 3, 4], page_size=4, salt=SALT)[:10] == keys
    # One token changed in page 6 changes the keys of pages 6.. and no earlier one.
    changed = list(tokens)
    changed[25] += 1
    other = page_keys(changed, page_size=4, salt=SALT)
    assert other[:6] == keys[:6]
    assert all(a != b for a, b in zip(other[6:], keys[6:]))
    # The same page tokens after another history get another key.
    moved = [9, 9, 9, 9] + tokens[4:]
    assert page_tokens(moved, page_index=1, page_size=4) == page_tokens(
        tokens, page_index=1, page_size=4
    )
    assert page_keys(moved, page_size=4, salt=SALT)[1] != keys[1]


def test_the_salt_separates_engines():
    tokens = list(range(3, 35))
    base = dict(model="tiny", dtype="float32", page_size=4, bounds_dtype=None, world_size=1)
    keys = page_keys(tokens, page_size=4, salt=cache_salt(**base))
    for field, value in [("model", "other"), ("dtype", "bfloat16"), ("world_size", 2),
                         ("bounds_dtype", "float8_e4m3fn"), ("page_size", 8),
                         ("tensor_parallel_size", 2)]:  # fmt: skip
        salt = cache_salt(**{**base, field: value})
        assert salt != cache_salt(**base)
        other = page_keys(tokens, page_size=4, salt=salt)
        assert not set(other) & set(keys), field
    assert cache_salt(**base, weights=(("a.safetensors", 1),)) != cache_salt(**base)


def test_the_same_keys_in_another_process():
    """Keys and salts depend on the bytes only, not on the process (hash() is salted)."""
    code = (
        "from longquest.engine.page_keys import cache_salt, page_keys\n"
        "salt = cache_salt(model='tiny', dtype='float32', page_size=4, bounds_dtype=None,"
        " world_size=1)\n"
        "print(b''.join(page_keys(list(range(3, 43)), page_size=4, salt=salt)).hex())\n"
    )
    root = Path(__file__).resolve().parents[2]
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        outputs.append(run.stdout.strip())
    mine = b"".join(page_keys(list(range(3, 43)), page_size=4, salt=SALT)).hex()
    assert outputs == [mine, mine]
