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


def all_reduce_floats(values: list[float], op: str = "sum") -> list[float]:
    """Plain numbers reduced over every rank ('sum' or 'max'), as float64; the numbers
    themselves without a process group. Every rank must call it (a collective). On NCCL the
    tensor goes through this rank's GPU, elsewhere (gloo) through the CPU."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [float(v) for v in values]
    import torch

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=ops[op])
    return t.cpu().tolist()


# ------------------------------------------------------------------------------- exact batches


class ZeroWeight(int):
    """A dataset index whose row fills a rank's slot in a global step that has no row left for
    it: the rank still runs the forward and backward (so DDP's all-reduce matches), at weight 0."""


class ExactShards:
    """One rank's per-device batches such that W ranks together see exactly the global batches
    of one process with batch W * b, in the same seeded order, with nothing repeated.

    `batches` is the per-device batch sampler every rank builds alike (b rows each, the same
    seeded permutation, the last one short). Global step k is batches kW .. kW+W-1, rank r
    takes batch kW+r; in the last step a rank with no batch left gets one `ZeroWeight` row.
    Every rank therefore takes ceil(len(batches) / W) steps, as one process with batch W * b.
    """

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world
        self.batch_size = getattr(batches, "batch_size", None)

    def __len__(self) -> int:
        return -(-len(self.batches) // self.world)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.batches, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __iter__(self):
        step: list[list[int]] = []
        for batch in self.batches:
            step.append(list(batch))
            if len(step) == self.world:
                yield step[self.rank]
                step = []
        if step:
            yield step[self.rank] if self.rank < len(step) else [ZeroWeight(step[0][0])]


class _ZeroWeightRows:
    """A map-style dataset whose `ZeroWeight` indices give `zero_row(row)`: the row with nothing
    counted in the loss (no pairs, no target tokens)."""

    def __init__(self, dataset, zero_row):
        self.dataset, self.zero_row = dataset, zero_row

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        row = self.dataset[int(i)]
        return self.zero_row(row) if isinstance(i, ZeroWeight) else row

    def __getitems__(self, indices):
        return [self[i] for i in indices]

    def __getattr__(self, name):  # column_names and the like, for whoever reads them
        if name == "dataset":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def exact_train_dataloader(loader, world: int, zero_row):
    """Make a train dataloader that accelerate prepared for `world` ranks yield `ExactShards`.

    accelerate's `BatchSamplerShard` deals the same per-device batches round-robin, but pads the
    last global batch with rows from the start (`even_batches`), so W ranks train on rows one
    process never sees in that step. Here the shard wrapper becomes a pass-through over
    `ExactShards` of the batches it wraps (the way transformers neutralises it for its own
    rank-aware sampler). `zero_row(row)` is the row at weight 0 (see `ZeroWeight`). With one
    process accelerate adds no wrapper and nothing changes.
    """
    shard = getattr(loader, "batch_sampler", None)
    if world <= 1 or shard is None or not hasattr(shard, "num_processes"):
        return loader
    if shard.split_batches or shard.drop_last:
        raise ValueError("exact data parallelism needs whole per-device batches without drop_last")
    shard.batch_sampler = ExactShards(shard.batch_sampler, shard.process_index, shard.num_processes)
    shard.num_processes, shard.process_index, shard.even_batches = 1, 0, False
    shard.batch_size = None  # batches may be short (the last) or one ZeroWeight row
    # DataLoader forbids reassigning `dataset`; its iterators read the attribute when created.
    object.__setattr__(loader, "dataset", _ZeroWeightRows(loader.dataset, zero_row))
    return loader
