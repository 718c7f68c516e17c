"""Ranks working together: T tensor ranks (weights split, ``mesh.py``, ``tensor.py``) x
S sequence ranks, each of which holds some whole KV pages of every sequence.

- :class:`PageOwnership` — which rank owns each page (zigzag prefill chunks,
  rotating decode pages); plain Python.
- :class:`SequenceParallelComm` — the cross-rank steps of decode attention
  (global top-k, log-sum-exp merge) over an explicitly passed process group.
"""

from longquest.parallel.comm import SequenceParallelComm
from longquest.parallel.ownership import PageOwnership

__all__ = ["PageOwnership", "SequenceParallelComm"]
