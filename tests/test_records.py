"""Run-folder records: skip when unchanged, run when absent, refuse changed inputs unless forced."""

from __future__ import annotations

import json
import time

import pytest

from posttrain.files import atomic_dir, atomic_write_json, hash_path, read_json, write_jsonl
from posttrain.records import InputHasher, InputsChanged, output_path, plan_stage, read_record, write_record


def _finish(run_dir, n, stage, hashed, outputs):
    plan = plan_stage(run_dir, n, stage, hashed)
    assert plan.action == "run"
    return write_record(run_dir, n, stage, plan=plan, outputs=outputs, metrics={"x": 1.0}, started=time.time())


def test_absent_record_runs_then_unchanged_inputs_skip(tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_jsonl(data, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    hasher = InputHasher(tmp_path)
    hashed = {"inputs": hasher.hash_paths({"prefs": str(data)}), "config": {"lr": 1e-5}}
    out = tmp_path / "round_01" / "rm" / "model"
    out.mkdir(parents=True)
    (out / "w.safetensors").write_bytes(b"123")
    record = _finish(tmp_path, 1, "rm", hashed, {"model": "round_01/rm/model"})

    assert read_record(tmp_path, 1, "rm") == record
    assert record["outputs"]["model"]["sha256"] == hash_path(out)
    assert output_path(tmp_path, record, "model") == out
    again = plan_stage(tmp_path, 1, "rm", {"inputs": InputHasher(tmp_path).hash_paths({"prefs": str(data)}),
                                          "config": {"lr": 1e-5}})
    assert again.action == "skip"
    assert again.record == record


def test_changed_data_is_refused_naming_the_input_unless_forced(tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_jsonl(data, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    hashed = {"inputs": InputHasher(tmp_path).hash_paths({"prefs": str(data)}), "config": {"lr": 1e-5}}
    _finish(tmp_path, 1, "rm", hashed, {})

    write_jsonl(data, [{"prompt": "a", "chosen": "CHANGED", "rejected": "c"}])
    changed = {"inputs": InputHasher(tmp_path).hash_paths({"prefs": str(data)}), "config": {"lr": 1e-5}}
    with pytest.raises(InputsChanged, match=r"round 1 stage 'rm'.*changed: inputs.*--force"):
        plan_stage(tmp_path, 1, "rm", changed)
    assert plan_stage(tmp_path, 1, "rm", changed, force=True).action == "run"


def test_changed_config_is_refused(tmp_path):
    _finish(tmp_path, 2, "sft", {"config": {"lr": 1e-5}}, {})
    with pytest.raises(InputsChanged, match="changed: config"):
        plan_stage(tmp_path, 2, "sft", {"config": {"lr": 2e-5}})


def test_outputs_of_earlier_records_are_not_rehashed(tmp_path, monkeypatch):
    out = tmp_path / "round_01" / "sample"
    out.mkdir(parents=True)
    (out / "top1.jsonl").write_text("{}\n")
    record = _finish(tmp_path, 1, "sample", {"config": {}}, {"top1": "round_01/sample/top1.jsonl"})
    hasher = InputHasher(tmp_path)
    hasher.learn(record)
    monkeypatch.setattr("posttrain.records.hash_path", lambda p: pytest.fail(f"re-hashed {p}"))
    got = hasher.hash_paths(str(out / "top1.jsonl"))
    assert got["sha256"] == record["outputs"]["top1"]["sha256"]


def test_missing_local_input_is_an_error_but_hub_ids_pass(tmp_path):
    hasher = InputHasher(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hasher.hash_paths(str(tmp_path / "nope.jsonl"))
    assert hasher.hash_paths("meta-llama/Llama-3.1-8B") == {"hub_id": "meta-llama/Llama-3.1-8B"}


def test_record_is_written_atomically_and_last(tmp_path, monkeypatch):
    """A crash while writing the record leaves no record (so the stage reruns/resumes)."""
    import posttrain.records as records

    def boom(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(records, "atomic_write_json", boom)
    plan = plan_stage(tmp_path, 1, "dpo", {"config": {}})
    with pytest.raises(KeyboardInterrupt):
        write_record(tmp_path, 1, "dpo", plan=plan, outputs={}, metrics={}, started=time.time())
    assert read_record(tmp_path, 1, "dpo") is None


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("new, half written")
            raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"


def test_hash_path_covers_names_and_bytes_of_a_folder(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "a").write_text("1")
    h1 = hash_path(d)
    (d / "a").write_text("2")
    h2 = hash_path(d)
    (d / "a").rename(d / "b")
    h3 = hash_path(d)
    (d / ".tmp-partial").write_text("ignored")
    assert len({h1, h2, h3}) == 3
    assert hash_path(d) == h3


def test_atomic_write_json_roundtrip(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert read_json(tmp_path / "x.json") == {"a": [1, 2]}
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}


def test_same_bytes_at_another_path_is_the_same_input(tmp_path):
    """A cache or data folder that moved (same content) must not make a finished stage 'changed'."""
    a, b = tmp_path / "a" / "prefs.jsonl", tmp_path / "b" / "prefs.jsonl"
    for p in (a, b):
        write_jsonl(p, [{"prompt": "x", "chosen": "y", "rejected": "z"}])
    _finish(tmp_path, 1, "rm", {"inputs": InputHasher(tmp_path).hash_paths({"prefs": str(a)})}, {})
    moved = {"inputs": InputHasher(tmp_path).hash_paths({"prefs": str(b)})}
    assert plan_stage(tmp_path, 1, "rm", moved).action == "skip"
