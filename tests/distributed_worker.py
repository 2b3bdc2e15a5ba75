"""The stage worker with test instruments, for tests/test_distributed.py (not a test module).

Run as `python tests/distributed_worker.py SPEC.json` under a launcher. It runs exactly
`posttrain.rounds.worker.main`, with two optional instruments set by environment variables:

- POSTTRAIN_TEST_DUMP: a folder; each rank saves its own copy of the trained weights there
  (`rank<R>.pt`, taken just before the final save) and the times it returned from the save.
- POSTTRAIN_TEST_SAVE_DELAY: seconds rank 0 sleeps after writing the final model into its
  temporary folder and before publishing it, so another rank that did not wait would be seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path


def _instrument(dump: Path | None, delay: float) -> None:
    from posttrain import distributed, gather, modeling

    real_save = gather.save_final_model
    real_atomic_dir = modeling.atomic_dir

    def save_final_model(trainer, tokenizer, out_dir, **kwargs):
        import torch

        rank = distributed.rank()
        if dump is not None:
            model = trainer.accelerator.unwrap_model(trainer.model)
            torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, dump / f"rank{rank}.pt")
        out = real_save(trainer, tokenizer, out_dir, **kwargs)
        if dump is not None:
            with open(dump / f"times{rank}.jsonl", "a") as f:
                f.write(json.dumps({"event": "returned", "out": str(out_dir), "t": time.time()}) + "\n")
        return out

    @contextlib.contextmanager
    def slow_atomic_dir(final):
        with real_atomic_dir(final) as tmp:
            yield tmp
            time.sleep(delay)  # written, not yet published
        if dump is not None:
            with open(dump / "times0.jsonl", "a") as f:
                f.write(json.dumps({"event": "published", "out": str(final), "t": time.time()}) + "\n")

    gather.save_final_model = save_final_model
    if delay > 0:
        modeling.atomic_dir = slow_atomic_dir


def main() -> int:
    dump = os.environ.get("POSTTRAIN_TEST_DUMP")
    delay = float(os.environ.get("POSTTRAIN_TEST_SAVE_DELAY", "0"))
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
    _instrument(Path(dump) if dump else None, delay)
    import torch

    torch.set_num_threads(1)
    from posttrain.rounds.worker import main as worker_main

    return worker_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
