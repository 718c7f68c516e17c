"""Collective calls that differ between the torch releases this package supports."""

from __future__ import annotations

import torch.distributed as dist

# all_gather_single replaces the deprecated all_gather_into_tensor in newer torch; older
# releases only have the latter. Called as ``(output, input, group=...)``: ``output`` is
# ``world_size`` times ``input``, rank-major.
all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
