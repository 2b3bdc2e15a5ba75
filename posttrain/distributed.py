"""Several processes training one model: who writes, who waits (process-group primitives).

Rules every training stage follows under a launcher (DDP, FSDP2, ZeRO-3):

- Only rank 0 writes (final models, per-variant metrics, caches); the other ranks wait at a
  barrier until it has finished, so no rank moves on (or exits) before the output exists.
- The final model is gathered collectively (posttrain.gather.save_final_model).
- Single process: every helper is a no-op or a plain call.
"""

from __future__ import annotations

import os


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        dist.barrier()


def main_then_wait(fn, *args, **kwargs):
    """Run `fn` on rank 0 only, then hold every rank at a barrier until it is done.

    Returns fn's result on rank 0 and None elsewhere. If rank 0 fails, the launcher ends the
    other ranks (torchrun and accelerate stop the whole group when one process exits non-zero).
    """
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def all_sum(value):
    """Sum of a tensor over every rank (the tensor itself without a process group)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
