"""What the training stages share: the data counts' shape, and the work folder's deletion."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from posttrain import training
from posttrain.files import atomic_write_json


def test_data_counts_take_the_largest_variant_and_drop_empty_reasons():
    c = training.data_counts("pairs", read=10, dropped={"too_long": 2, "strength_slightly_better": 0},
                             truncated=1, trained_by_variant={"v0": 8, "v1": 4, "v2": None})
    assert c == {"unit": "pairs", "rows_read": 10, "rows_trained": 8, "rows_trained_by_variant": {"v0": 8, "v1": 4},
                 "dropped": {"too_long": 2}, "truncated": 1}


def _stage_with_work(stage_dir):
    ckpt = stage_dir / "work" / "v0" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(b"x" * 1000)
    (stage_dir / "model").mkdir()
    (stage_dir / "model" / "model.safetensors").write_bytes(b"w")


def test_remove_work_only_once_the_record_exists(tmp_path):
    stage = tmp_path / "round_01" / "sft"
    _stage_with_work(stage)
    with pytest.raises(RuntimeError, match="needed to resume"):
        training.remove_work(stage)
    assert (stage / "work").is_dir()
    atomic_write_json(stage / "record.json", {"stage": "sft"})
    assert training.remove_work(stage) == 1000
    assert not (stage / "work").exists() and (stage / "model" / "model.safetensors").is_file()
    assert training.remove_work(stage) == 0  # nothing left: fine


def test_remove_work_keeps_the_variants_the_record_names(tmp_path):
    """rm's and sft's variants, once averaged into the stage's model, go with the work; dpo's
    are its outputs and stay."""
    run_dir = tmp_path / "run"
    for stage, outputs in (("sft", {"model": "round_01/sft/model"}),
                           ("dpo", {"variants": ["round_01/dpo/variants/v0/model", "round_01/dpo/variants/v1/model"]}),
                           ("rm", {"model": "round_01/rm/model"})):
        folder = run_dir / "round_01" / stage
        for name in ("v0", "v1") if stage != "rm" else ("v0",):
            (folder / "variants" / name / "model").mkdir(parents=True)
            (folder / "variants" / name / "model" / "model.safetensors").write_bytes(b"x" * 10)
        atomic_write_json(folder / "record.json", {"stage": stage, "outputs": {
            k: {"path": v} for k, v in outputs.items()}})
        freed = training.remove_work(folder)
        left = sorted(p.name for p in (folder / "variants").glob("*")) if (folder / "variants").exists() else []
        assert (stage, freed, left) == {"sft": ("sft", 20, []), "dpo": ("dpo", 0, ["v0", "v1"]),
                                         "rm": ("rm", 10, [])}[stage]


def test_a_one_variant_stage_model_is_its_variant_linked_not_copied(tmp_path):
    src = tmp_path / "variants" / "v0" / "model"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"w" * 100)
    run = training.VariantRun(index=0, name="v0", variant=training.Variant(), seed=0, model_dir=src,
                              work_dir=tmp_path / "work" / "v0")
    out = training.average_variants([run], tmp_path / "model")
    assert out == tmp_path / "model"
    assert os.path.samefile(out / "model.safetensors", src / "model.safetensors")
    shutil.rmtree(tmp_path / "variants")  # what remove_work does once the record exists
    assert (out / "model.safetensors").read_bytes() == b"w" * 100


@pytest.mark.parametrize("keep", [False, True])
def test_the_orchestrator_removes_a_finished_stages_work_unless_kept(tmp_path, keep):
    from posttrain.recipe import load_recipe
    from posttrain.rounds.orchestrator import Round

    raw = yaml.safe_load(load_recipe("demo").path.read_text())
    raw.setdefault("run", {})["keep_checkpoints"] = keep
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    stage = run_dir / "round_01" / "sft"
    _stage_with_work(stage)
    atomic_write_json(stage / "record.json", {"stage": "sft", "round": 1})
    Round(1, load_recipe(tmp_path / "recipe.yaml"), run_dir)._remove_work("sft")
    assert (stage / "work").exists() == keep


# ----------------------------------------------------------------------------- mixed precision


def _one_step(model_dir, tmp_path, precision: str, *, weights_dtype=None):
    """One AdamW step at lr 1e-5 through the arguments every stage uses; returns the trainer, the
    weights before, and the dtypes the model's linear layers computed in."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from posttrain.modeling import load_causal_lm_for_training

    settings = training.TrainingSettings(learning_rate=1e-5, batch_size=4, precision=precision, save_steps=100)
    common = training.trainer_common_args(settings, training.Variant(), output_dir=tmp_path, seed=0)
    args = TrainingArguments(**{**common, "save_strategy": "no"}, max_steps=1)
    model = load_causal_lm_for_training(model_dir)
    if weights_dtype is not None:
        model = model.to(weights_dtype)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    computed = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: computed.add(out.dtype))
    ids = list(range(3, 19))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": ids, "labels": ids}] * 4))
    trainer.train()
    return trainer, before, computed


def test_bf16_trains_over_fp32_master_weights_so_small_steps_are_kept(tiny_model_dir, tmp_path):
    import torch

    trainer, before, computed = _one_step(tiny_model_dir, tmp_path / "mixed", "bf16")
    assert computed == {torch.bfloat16}                       # the compute is bf16 (autocast) ...
    params = dict(trainer.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}  # ... over fp32 weights
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    assert state and {t.dtype for t in state} == {torch.float32}  # and fp32 AdamW moments
    changed = sum(not torch.equal(before[k], p.detach()) for k, p in params.items())
    assert changed == len(params)                              # every weight took its 1e-5 step

    # What fp32 masters prevent: the same step on bf16 weights is mostly rounded away.
    pure, before_bf16, _ = _one_step(tiny_model_dir, tmp_path / "pure", "bf16", weights_dtype=torch.bfloat16)
    kept = [(p.detach() != before_bf16[k]).float().mean().item() for k, p in pure.model.named_parameters()
            if p.ndim == 2]
    assert sum(kept) / len(kept) < 0.5


def test_auto_precision_is_fp32_on_a_cpu_and_the_default_hashes_as_before():
    assert training.mixed_bf16(training.TrainingSettings()) is False  # no GPU here
    assert "precision" not in training.TrainingSettings().model_dump()
    assert training.TrainingSettings(precision="bf16").model_dump()["precision"] == "bf16"
