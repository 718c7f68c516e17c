"""Keys of full KV pages for the prefix cache: a SHA-256 chain over the prompt's tokens.

Page ``i``'s key is ``SHA-256(key of page i - 1 + tokens of page i)``, and page 0's
parent is the cache's salt, so a key stands for every token up to the end of its page
and for everything that shapes the page's K/V. Only full pages have keys. The keys are
the same in every process and on every rank (Python's ``hash()`` is salted per process).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from longquest import __version__

# Token ids as 4-byte ints: what a page's key and its index entry hash.
TOKEN_TYPECODE = "i"
assert array(TOKEN_TYPECODE).itemsize == 4, "page keys hash token ids as 4-byte ints"


def cache_salt(
    *,
    model: object,
    dtype: object,
    page_size: int,
    bounds_dtype: object,
    world_size: int,
    tensor_parallel_size: int = 1,
    weights: object = (),
) -> bytes:
    """SHA-256 of what shapes a page's K/V or its placement: the model's config and
    ``weights`` (e.g. the weight files' names and sizes), the cache dtypes, the page size,
    the world size and its tensor-parallel size (a rank's pages hold only its KV heads)
    and longquest's version. Each value's ``repr`` must
    be the same in every process. Pages of two engines share keys only if their salts
    are equal."""
    identity = dict(model=model, dtype=dtype, page_size=page_size, bounds_dtype=bounds_dtype,
                    world_size=world_size, tensor_parallel_size=tensor_parallel_size,
                    weights=weights, version=__version__)  # fmt: skip
    return hashlib.sha256(repr(sorted(identity.items())).encode()).digest()


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """``tokens`` as the bytes page keys hash (4-byte ints)."""
    return array(TOKEN_TYPECODE, tokens).tobytes()


class PromptKeys:
    """A prompt's packed tokens and the keys of its full pages, computed once per request.

    keys[i]: page ``i``'s key; :meth:`parent` and :meth:`tokens` give what an index entry
    of page ``i`` is checked against.
    """

    def __init__(self, tokens: Sequence[int], *, page_size: int, salt: bytes) -> None:
        self.salt = salt
        self.packed = pack_tokens(tokens)
        self.width = page_size * array(TOKEN_TYPECODE).itemsize
        keys, parent = [], salt
        for page in range(len(tokens) // page_size):
            parent = hashlib.sha256(parent + self.tokens(page)).digest()
            keys.append(parent)
        self.keys = keys

    def tokens(self, page: int) -> bytes:
        """Page ``page``'s tokens as bytes."""
        return self.packed[page * self.width : (page + 1) * self.width]

    def parent(self, page: int) -> bytes:
        """The key page ``page`` chains from: the previous page's, or the salt."""
        return self.keys[page - 1] if page else self.salt


def page_tokens(tokens: Sequence[int], *, page_index: int, page_size: int) -> bytes:
    """The tokens of page ``page_index`` of ``tokens`` as the bytes its key hashes."""
    start = page_index * page_size
    return pack_tokens(tokens[start : start + page_size])


def page_keys(tokens: Sequence[int], *, page_size: int, salt: bytes) -> list[bytes]:
    """The 32-byte keys of the ``len(tokens) // page_size`` full pages of ``tokens``."""
    return PromptKeys(tokens, page_size=page_size, salt=salt).keys
