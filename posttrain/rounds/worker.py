"""The process a stage runs in: `python -m posttrain.rounds.worker SPEC.json`.

One process per stage, so GPU memory is released between stages (vLLM and training never
share a process), and so a training stage can be started with `accelerate launch -m
posttrain.rounds.worker SPEC.json` across GPUs and nodes without changing the orchestrator.
The spec is written by the orchestrator; it names the world size the launch plan promised
(`posttrain.launch`), checked here first, and, when the world spans several nodes, that every
node sees the run folder node 0 writes (posttrain.rounds.nodes). The result is written
atomically by rank 0, after every rank has finished. Under torch's elastic agent a rank's
exception is also recorded in its TORCHELASTIC_ERROR_FILE, so the failure report names it
(posttrain.rounds.agent).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from posttrain import distributed
from posttrain.files import atomic_write_json, read_json
from posttrain.launch import check_world_size
from posttrain.rounds.nodes import check_shared_run_folder


def make_context(defn, n: int, run_dir: Path, out_dir: Path, recipe, inputs, seed: int):
    """The context a stage runs with: its typed config section and inputs, and the recipe's
    settings every stage reads. The orchestrator builds it directly for a stage in its own
    process; a worker builds it from its spec (`build_context`)."""
    from posttrain.stage import StageContext

    return StageContext(
        stage=defn.name,
        round=n,
        run_dir=run_dir,
        out_dir=out_dir,
        config=defn.config_of(recipe),
        inputs=inputs,
        recipe=recipe,
        seed=seed,
        trust_remote_code=recipe.models.trust_remote_code,
        formatting_tokens=recipe.chat.formatting_tokens,
        report_to=list(recipe.run.report_to) or "none",
        keep_checkpoints=recipe.run.keep_checkpoints,
    )


def build_context(spec: dict):
    """The context from a worker's spec (JSON written by the orchestrator)."""
    from posttrain.recipe import Recipe
    from posttrain.stage import get

    defn = get(spec["stage"])
    return make_context(defn, spec["round"], Path(spec["run_dir"]), Path(spec["out_dir"]),
                        Recipe.model_validate(spec["recipe"]), defn.inputs(**spec["inputs"]), spec["seed"])


def run_spec(spec: dict):
    ctx = build_context(spec)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    from posttrain.stage import module

    return module(spec["stage"]).run(ctx)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m posttrain.rounds.worker SPEC.json", file=sys.stderr)
        return 2
    spec = read_json(argv[0])
    from posttrain.progress import quiet_libraries

    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    launch = spec.get("launch") or {}
    # A launcher that started another number of processes than planned would train with
    # another global batch than the record says: stop before any work.
    check_world_size(int(launch.get("world_size", 1)), launch.get("launcher"))
    check_shared_run_folder(spec["out_dir"], spec["run_dir"], int(launch.get("nodes", 1)))
    result = run_spec(spec)
    distributed.barrier()  # every rank's share of the stage is done before rank 0 reports it
    if distributed.is_main():
        atomic_write_json(spec["result"], {"outputs": result.outputs, "metrics": result.metrics})
    return 0


if __name__ == "__main__":
    sys.exit(main())
