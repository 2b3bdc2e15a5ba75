"""A stage's record is written only once its model outputs are complete, and `--redo` reruns
a finished stage (issue 15: a dpo folder without weights was recorded as finished, and
`--force` did not rerun a stage whose inputs were unchanged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from posttrain.files import atomic_write_json
from posttrain.modeling import ModelFolderError, verify_model_folder
from posttrain.recipe import load_recipe
from posttrain.records import read_record
from posttrain.rounds.orchestrator import Round, RoundError, run_round


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------- verify_model_folder


def test_a_saved_checkpoint_is_complete(tiny_model_dir):
    verify_model_folder(tiny_model_dir)


@pytest.mark.parametrize("damage,message", [
    (lambda d: [p.unlink() for p in d.glob("*.safetensors")], "no safetensors weights"),
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json: unreadable"),
    (lambda d: (d / "config.json").write_text("{}"), "config.json: no model_type"),
    (lambda d: (d / "tokenizer_config.json").unlink(), "no tokenizer"),
    (lambda d: (d / "tokenizer.json").write_text('{"version": "1.0"}'), "tokenizer.json: does not parse"),
    (lambda d: [p.write_bytes(p.read_bytes()[:-100]) for p in d.glob("*.safetensors")], "truncated"),
    (lambda d: [p.write_bytes(b"\x00" * 4) for p in d.glob("*.safetensors")], "not a safetensors file"),
    (lambda d: [p.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}") for p in d.glob("*.safetensors")],
     "not a safetensors file"),
    (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})), "model-00002-of-00002.safetensors is missing"),
])
def test_an_incomplete_folder_is_named_with_what_is_missing(tiny_model_dir, tmp_path, damage, message):
    folder = copy(tiny_model_dir, tmp_path / "model")
    damage(folder)
    with pytest.raises(ModelFolderError, match=message) as info:
        verify_model_folder(folder)
    assert str(folder) in str(info.value)


def test_an_adapter_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelFolderError, match="adapter_model.safetensors is missing"):
        verify_model_folder(folder)
    weights = next(tiny_model_dir.glob("*.safetensors"))
    shutil.copy(weights, folder / "adapter_model.safetensors")
    verify_model_folder(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        verify_model_folder(tmp_path / "nothing")


# ----------------------------------------------------------------------- the orchestrator


@pytest.fixture
def finished_dpo(tmp_path, tiny_model_dir):
    """A run folder whose round 1 has a dpo record with one variant: what `average` reads."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "rounds": 2, "models": {"base": "world:base_model"}}))
    run = tmp_path / "run"
    copy(tiny_model_dir, run / "round_01" / "dpo" / "v0")
    atomic_write_json(run / "round_01" / "dpo" / "record.json",
                      {"stage": "dpo", "round": 1, "outputs": {"variants": {"path": ["round_01/dpo/v0"]}}})
    return load_recipe(recipe), run


def average_round(loaded, run, calls, make_output, **kwargs) -> Round:
    rnd = Round(1, loaded, run, **kwargs)
    rnd.records["dpo"] = read_record(run, 1, "dpo")

    def fake_worker(stage, spec, *launch_command):
        calls.append(stage)
        make_output(Path(spec["out_dir"]) / "model")
        return {"outputs": {"model": "round_01/average/model"}, "metrics": {"n_inputs": 1}}

    rnd._run_in_worker = fake_worker
    return rnd


def test_redo_reruns_a_finished_stage_and_force_does_not(finished_dpo, tiny_model_dir):
    loaded, run = finished_dpo
    calls: list[str] = []
    write = lambda out: copy(tiny_model_dir, out)  # noqa: E731
    average_round(loaded, run, calls, write).run_stage("average")
    first = read_record(run, 1, "average")
    assert calls == ["average"] and first is not None
    average_round(loaded, run, calls, write).run_stage("average")
    average_round(loaded, run, calls, write, force=True).run_stage("average")
    assert calls == ["average"]  # unchanged inputs: skipped, with or without --force
    stale = run / "round_01" / "average" / "stale-partial-work"
    stale.mkdir()
    rnd = average_round(loaded, run, calls, write, redo=("average",))
    rnd.run_stage("average")
    assert calls == ["average", "average"] and rnd.redone
    again = read_record(run, 1, "average")
    assert again["timing"]["finished"] > first["timing"]["finished"]
    assert not stale.exists()  # redone from scratch, not resumed from what was there


def test_a_stage_with_an_incomplete_model_gets_no_record(finished_dpo, tiny_model_dir):
    loaded, run = finished_dpo
    calls: list[str] = []

    def without_weights(out):
        copy(tiny_model_dir, out)
        for p in out.glob("*.safetensors"):
            p.unlink()

    with pytest.raises(RoundError, match=r"round 1 average: its output is incomplete.*no safetensors weights"
                                         r".*--redo average"):
        average_round(loaded, run, calls, without_weights).run_stage("average")
    assert read_record(run, 1, "average") is None
    # the documented way out: redo it
    average_round(loaded, run, calls, lambda out: copy(tiny_model_dir, out), redo=("average",)).run_stage("average")
    assert read_record(run, 1, "average") is not None


def test_redo_names_a_stage(tmp_path):
    with pytest.raises(RoundError, match="--redo dop: not a stage"):
        run_round(1, "demo", tmp_path, redo="dop")


def test_redo_on_the_command_line(capsys):
    from posttrain.cli import build_parser

    args = build_parser().parse_args(["run-round", "2", "--recipe", "demo", "--run-dir", "x", "--redo", "dpo",
                                      "--redo", "average"])
    assert args.redo == ["dpo", "average"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--recipe", "demo", "--run-dir", "x", "--redo", "dop"])
    capsys.readouterr()
