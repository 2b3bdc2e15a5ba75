"""Run folders with finished rounds made without training: each stage's outputs are copies
of the tiny model (or small files), recorded as the orchestrator records them. For tests of
what posttrain does with a run folder's records (verify, lock, hashes)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from posttrain.files import write_jsonl
from posttrain.records import plan_stage, write_record


def write_recipe(folder: Path, base_model: Path, **sections) -> Path:
    """A two-round recipe on `base_model` with a preference batch per round and prompts."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    for n in (1, 2):
        write_jsonl(data / f"prefs{n}.jsonl", [{**pair, "id": f"p{n}"}])
    write_jsonl(data / "heldout.jsonl", [{**pair, "id": "h"}])
    write_jsonl(data / "sft.jsonl", [{"id": "s", "messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "r"}]}])
    write_jsonl(data / "prompts.jsonl", [{"id": "q1", "prompt": "what?"}])
    recipe = {"name": "t", "rounds": 2, "models": {"base": str(base_model)},
              "data": {"preference_batches": [{"path": str(data / f"prefs{n}.jsonl"), "round": n} for n in (1, 2)],
                       "heldout_preferences": [str(data / "heldout.jsonl")], "sft": [str(data / "sft.jsonl")],
                       "prompts": [{"path": str(data / "prompts.jsonl")}],
                       "eval_prompts": [{"path": str(data / "prompts.jsonl")}]},
              **sections}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# The outputs each stage records, made from the tiny model (model folders) or as small files.
OUTPUTS = {
    "rm": {"model": "model"},
    "sample": {"samples": "samples/", "top1": "top1.jsonl"},
    "curate": {"top1": "top1.jsonl", "sft": "sft.jsonl", "preferences": "preferences.jsonl"},
    "sft": {"model": "model"},
    "dpo": {"variants": ["variants/v0/model"]},
    "average": {"model": "model"},
    "eval": {"responses": "responses.jsonl", "initial_responses": "initial_responses.jsonl"},
    "annotate": {"preferences": "preferences.jsonl"},
}


def make_outputs(run_dir: Path, n: int, stage: str, model: Path) -> dict:
    """Stage `stage`'s outputs in round `n`, relative to the run folder."""
    out = {}
    for name, rel in OUTPUTS[stage].items():
        rels = []
        for r in rel if isinstance(rel, list) else [rel]:
            path = run_dir / f"round_{n:02d}" / stage / r.rstrip("/")
            if r.endswith("model"):
                shutil.copytree(model, path, dirs_exist_ok=True)
            elif r.endswith("/"):
                path.mkdir(parents=True, exist_ok=True)
                write_jsonl(path / "shard-00000.jsonl", [{"id": "q1", "n": n}])
            else:
                write_jsonl(path, [{"id": "q1", "messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": f"r{n}"}]}])
            rels.append(path.relative_to(run_dir).as_posix())
        out[name] = rels if isinstance(rel, list) else rels[0]
    return out


def record_stage(run_dir: Path, n: int, stage: str, model: Path, hashed: dict | None = None) -> dict:
    """Make stage `stage`'s outputs and write its record, as if it had just finished."""
    outputs = make_outputs(run_dir, n, stage, model)
    plan = plan_stage(run_dir, n, stage, hashed or {"stage": stage}, force=True)
    return write_record(run_dir, n, stage, plan=plan, outputs=outputs, metrics={}, started=time.time())


def record_round(run_dir: Path, n: int, model: Path, stages=("rm", "sample", "sft", "dpo", "average", "eval")):
    return {s: record_stage(run_dir, n, s, model) for s in stages}
