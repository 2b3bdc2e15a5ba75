"""Verify before trust (issue 25): a recorded output is used only while its files are what
its record says; `posttrain verify` checks a whole run folder; `--force` and `--redo` make a
stage whose outputs are damaged again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from run_folders import record_round, record_stage, write_recipe

from posttrain.api import status_table
from posttrain.cli import main
from posttrain.files import atomic_write_json
from posttrain.recipe import load_recipe
from posttrain.records import OutputsDamaged, check_record, plan_stage, read_record, stage_dir, write_record
from posttrain.rounds.orchestrator import Round


def overwrite(path: Path, offset: int = 0, size: int = 100_000) -> None:
    """`size` bytes of 0xFF over `path` from `offset`, its length unchanged."""
    size = min(size, path.stat().st_size - offset)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


@pytest.fixture
def run(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    record_round(run, 1, tiny_model_dir)
    return run


def test_records_hold_each_files_size_mtime_and_hash(run):
    rec = read_record(run, 1, "average")
    files = rec["outputs"]["model"]["files"]
    weights = "round_01/average/model/model.safetensors"
    assert weights in files
    size, mtime_ns, digest = files[weights]
    st = (run / weights).stat()
    assert (size, mtime_ns) == (st.st_size, st.st_mtime_ns) and len(digest) == 64
    assert check_record(run, rec) == []


def test_changed_bytes_a_missing_file_and_an_added_file_are_each_named(run):
    weights = run / "round_01/average/model/model.safetensors"
    overwrite(weights)
    (run / "round_01/sample/top1.jsonl").unlink()
    (run / "round_01/sample/samples/extra.jsonl").write_text("{}\n")
    damage = {(d.stage, d.path): d.what for n in (1,) for s in ("average", "sample")
              for d in check_record(run, read_record(run, n, s))}
    assert damage == {
        ("average", "round_01/average/model/model.safetensors"): "differs from its record (its content changed)",
        ("sample", "round_01/sample/top1.jsonl"): "is missing",
        ("sample", "round_01/sample/samples/extra.jsonl"): "is not in its record (a file was added)",
    }


def test_a_touched_file_with_the_same_bytes_is_fine_and_full_hashes_everything(run):
    weights = run / "round_01/rm/model/model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert check_record(run, read_record(run, 1, "rm")) == []
    # Same size and mtime but other bytes: only a full check sees it.
    overwrite(weights, size=10)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    rec = read_record(run, 1, "rm")
    assert check_record(run, rec) == []
    assert [d.path for d in check_record(run, rec, full=True)] == ["round_01/rm/model/model.safetensors"]


def test_full_reads_a_large_file_whose_hash_is_cached_by_size_and_mtime(tmp_path):
    big = tmp_path / "round_01" / "sample" / "top1.jsonl"
    big.parent.mkdir(parents=True)
    big.write_bytes(b"x" * (2 << 20))  # large enough for posttrain.files.hash_path to cache its hash
    rec = write_record(tmp_path, 1, "sample", plan=plan_stage(tmp_path, 1, "sample", {}), metrics={},
                       outputs={"top1": "round_01/sample/top1.jsonl"}, started=0.0)
    st = big.stat()
    overwrite(big, size=10)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_record(tmp_path, rec) == []
    assert [d.path for d in check_record(tmp_path, rec, full=True)] == ["round_01/sample/top1.jsonl"]


def test_an_older_record_without_file_stamps_is_checked_by_its_hash(run):
    rec = read_record(run, 1, "sft")
    for out in rec["outputs"].values():
        del out["files"]
    atomic_write_json(stage_dir(run, 1, "sft") / "record.json", rec)
    assert check_record(run, read_record(run, 1, "sft")) == []
    overwrite(run / "round_01/sft/model/model.safetensors")
    assert [d.path for d in check_record(run, read_record(run, 1, "sft"))] == ["round_01/sft/model"]
    shutil.rmtree(run / "round_01/sft/model")
    assert [d.what for d in check_record(run, read_record(run, 1, "sft"))] == ["is missing"]


def test_verify_prints_one_line_per_problem_with_the_command_that_fixes_it(run, capsys):
    assert main(["verify", str(run)]) == 0
    assert "6 records" in capsys.readouterr().out
    overwrite(run / "round_01/average/model/model.safetensors")
    (run / "round_01/eval/responses.jsonl").unlink()
    assert main(["verify", str(run)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert lines[0].startswith(f"{run}/round_01/average/model/model.safetensors: differs from its record")
    assert f"posttrain run-round 1 --recipe RECIPE --run-dir {run} --redo average" in lines[0]
    assert lines[1].startswith(f"{run}/round_01/eval/responses.jsonl: is missing")
    assert f"posttrain eval {run} --round 1 --force" in lines[1]
    assert "Traceback" not in out + err


def test_verify_names_an_unreadable_record_and_a_missing_folder(run, capsys):
    (stage_dir(run, 1, "rm") / "record.json").write_text("{not json")
    assert main(["verify", str(run)]) == 1
    assert "round_01/rm/record.json: unreadable record" in capsys.readouterr().out
    assert main(["verify", str(run / "nothing")]) == 1
    assert "no such run folder" in capsys.readouterr().err


def test_status_shows_a_damaged_stage(run):
    assert "damaged" not in status_table(run)
    (run / "round_01/eval/responses.jsonl").unlink()
    row = status_table(run).splitlines()[2]
    assert row.split("  ")[-1].strip() == "damaged (see posttrain verify)"


# ----------------------------------------------------------------------- in the orchestrator


def average_round(loaded, run, calls, model, **kwargs) -> Round:
    rnd = Round(1, loaded, run, **kwargs)

    def fake_worker(stage, spec, *launch_command):
        calls.append(stage)
        shutil.copytree(model, Path(spec["out_dir"]) / "model")
        return {"outputs": {"model": "round_01/average/model"}, "metrics": {"n_inputs": 1}}

    rnd._run_in_worker = fake_worker
    return rnd


def test_a_damaged_output_is_refused_on_resume_and_made_again_by_force_or_redo(tmp_path, tiny_model_dir):
    loaded = load_recipe(write_recipe(tmp_path, tiny_model_dir))
    run = tmp_path / "run"
    record_stage(run, 1, "dpo", tiny_model_dir)
    calls: list[str] = []
    average_round(loaded, run, calls, tiny_model_dir).run_stage("average")
    weights = run / "round_01/average/model/model.safetensors"
    overwrite(weights)
    with pytest.raises(OutputsDamaged) as info:
        average_round(loaded, run, calls, tiny_model_dir).run_stage("average")
    assert str(info.value) == (
        f"{weights}: differs from its record (its content changed); it was recorded by round 1 average, so "
        f"nothing uses it. Make it again with `posttrain run-round 1 --recipe {loaded.path} --run-dir {run} "
        f"--redo average` (later stages that used it then run again).")
    assert calls == ["average"]
    rnd = average_round(loaded, run, calls, tiny_model_dir, force=True)
    rnd.run_stage("average")
    assert calls == ["average", "average"] and rnd.redone
    assert check_record(run, read_record(run, 1, "average")) == []
    shutil.rmtree(run / "round_01/average/model")
    average_round(loaded, run, calls, tiny_model_dir, redo=("average",)).run_stage("average")
    assert calls == ["average"] * 3 and check_record(run, read_record(run, 1, "average")) == []


def test_a_later_stage_refuses_a_damaged_input(tmp_path, tiny_model_dir):
    loaded = load_recipe(write_recipe(tmp_path, tiny_model_dir))
    run = tmp_path / "run"
    record_stage(run, 1, "dpo", tiny_model_dir)
    overwrite(run / "round_01/dpo/variants/v0/model/model.safetensors")
    calls: list[str] = []
    with pytest.raises(OutputsDamaged, match=r"v0/model/model.safetensors: differs.*round 1 dpo.*--redo dpo"):
        average_round(loaded, run, calls, tiny_model_dir).run_stage("average")
    assert calls == []
