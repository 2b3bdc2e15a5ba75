"""The round orchestrator: ordering, refusal, status, and (slow) whole rounds through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain.files import atomic_write_json, iter_jsonl, write_jsonl
from posttrain.records import read_record
from posttrain.rounds.orchestrator import RoundError, check_previous_round, parse_rounds

STAGES = ("rm", "sample", "sft", "dpo", "average")


def test_parse_rounds():
    assert parse_rounds("3") == [3]
    assert parse_rounds("1-6") == [1, 2, 3, 4, 5, 6]
    assert parse_rounds("1,3-4") == [1, 3, 4]
    with pytest.raises(RoundError, match="rounds start at 1"):
        parse_rounds("0")


def test_round_n_refuses_when_round_n_minus_1_is_unfinished(tmp_path):
    for stage in ("rm", "sample"):
        atomic_write_json(tmp_path / "round_01" / stage / "record.json", {"stage": stage, "round": 1})
    with pytest.raises(RoundError, match=r"round 2 needs round 1 finished.*no record for: sft, dpo, average"):
        check_previous_round(tmp_path, 2)
    check_previous_round(tmp_path, 1)  # round 1 needs nothing


def test_status_table_shows_states_metrics_and_partial_stages(tmp_path):
    from posttrain.api import status_table

    atomic_write_json(tmp_path / "round_01" / "rm" / "record.json",
                      {"metrics": {"heldout": {"accuracy": 0.8125}}, "timing": {"seconds": 12.4}})
    (tmp_path / "round_01" / "sample" / "samples").mkdir(parents=True)
    table = status_table(tmp_path)
    lines = table.splitlines()
    assert lines[0].split() == ["round", "rm", "sample", "sft", "dpo", "average", "eval"]
    assert "done 12s acc=0.812" in lines[2]
    assert "partial" in lines[2]
    assert lines[2].split()[0] == "1"


def test_cli_help_lists_every_command(capsys):
    from posttrain.cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "run-round", "run", "validate", "validate-data", "status", "eval", "report", "average"):
        assert cmd in out


# ---------------------------------------------------------------------------------- slow


def small_recipe(tmp_path: Path, *, n_prompts: int = 24, shard_size: int = 8) -> Path:
    """The demo recipe, shrunk: a prompt subset, few steps, short evaluation."""
    from posttrain.world.build import ensure_world

    world = ensure_world()
    prompts = list(iter_jsonl(world.train_prompts))[:n_prompts]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "demo.yaml").read_text())
    recipe["data"]["prompts"] = [{"path": str(tmp_path / "prompts.jsonl")}]
    recipe["rm"].update(epochs=1)
    recipe["sample"].update(k=4, shard_size=shard_size)
    recipe["sft"].update(epochs=1)
    recipe["dpo"].update(epochs=1)
    recipe["eval"].update(max_prompts=16)
    if "annotate" in recipe:
        recipe["annotate"].update(prompts=[str(tmp_path / "prompts.jsonl")], comparisons=16)
    path = tmp_path / "small.yaml"
    path.write_text("# posttrain run --recipe small.yaml --run-dir run --rounds 1-2\n" + yaml.safe_dump(recipe))
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POSTTRAIN_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], env=env, capture_output=True,
                          text=True, **kw)


@pytest.mark.slow
def test_two_rounds_end_to_end_through_the_cli(tmp_path):
    recipe = small_recipe(tmp_path)
    run_dir = tmp_path / "run"
    done = cli("run", "--rounds", "1-2", "--recipe", str(recipe), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    for n in (1, 2):
        for stage in (*STAGES, "eval"):
            rec = read_record(run_dir, n, stage)
            assert rec is not None, f"round {n} {stage} has no record"
            assert rec["round"] == n and rec["stage"] == stage
            for out in rec["outputs"].values():
                paths = out["path"] if isinstance(out["path"], list) else [out["path"]]
                assert all((run_dir / p).exists() for p in paths)
    # Round 2 trained its RM on both batches (the recipe's and the one annotated on round 1's
    # models, cumulative) and sampled from round 1's model.
    rm2 = read_record(run_dir, 2, "rm")
    assert len(rm2["inputs"]["inputs"]["preference_files"]) == 2
    sample2 = read_record(run_dir, 2, "sample")
    round1_model = read_record(run_dir, 1, "average")["outputs"]["model"]
    assert sample2["inputs"]["inputs"]["policy_model"]["sha256"] == round1_model["sha256"]
    # Evaluation ran and measured the task.
    ev = read_record(run_dir, 2, "eval")["metrics"]
    assert 0.0 <= ev["task_score"] <= 1.0
    assert 0.0 <= ev["eot_rate"] <= 1.0
    per_prompt = yaml.safe_load(recipe.read_text())["eval"]["samples_per_prompt"]
    assert ev["win_rate_vs_previous"] is not None
    assert (ev["prompts"], ev["responses"]) == (16, 16 * per_prompt)
    # The averaged model is evaluated beside each DPO variant it averages.
    assert sorted(ev["variants"]) == ["v0", "v1"]
    assert all(0.0 <= v["task_score"] <= 1.0 for v in ev["variants"].values())
    best = max(v["task_score"] for v in ev["variants"].values())
    assert ev["average_minus_best_variant"] == pytest.approx(ev["task_score"] - best)
    # The sampled scores are recorded for every prompt.
    shards = sorted((run_dir / "round_01" / "sample" / "samples").glob("shard_*.jsonl"))
    rows = [r for s in shards for r in iter_jsonl(s)]
    assert len(rows) == 24 and all(len(r["scores"]) == 4 for r in rows)

    # A second run of the same command skips everything.
    again = cli("run", "--rounds", "1-2", "--recipe", str(recipe), "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished earlier, skipped") == 14  # 5 stages, eval and annotate, x 2 rounds

    status = cli("status", str(run_dir))
    assert status.returncode == 0 and "done" in status.stdout
    rep = cli("report", str(run_dir))
    assert rep.returncode == 0, rep.stderr[-2000:]
    report = (run_dir / "report" / "report.md").read_text()
    assert "| 2 |" in report
    assert (run_dir / "report" / "metrics.png").stat().st_size > 1000
    assert (run_dir / "report" / "sample_scores.png").stat().st_size > 1000

    # A changed recipe is refused for finished stages, naming what changed.
    data = yaml.safe_load(recipe.read_text())
    data["dpo"]["beta"] = 0.2
    recipe.write_text("# posttrain\n" + yaml.safe_dump(data))
    refused = cli("run-round", "2", "--recipe", str(recipe), "--run-dir", str(run_dir))
    assert refused.returncode == 1
    assert "stage 'dpo' already finished with other inputs (changed: config)" in refused.stderr


def _kill_when(proc: subprocess.Popen, path_glob: tuple[Path, str], timeout: float = 900) -> None:
    folder, pattern = path_glob
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {pattern} appeared")
        if folder.exists() and any(folder.glob(pattern)):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{pattern} did not appear in {timeout} s")


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_finishes_like_an_uninterrupted_run(tmp_path):
    recipe = small_recipe(tmp_path, n_prompts=24, shard_size=6)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["run-round", "1", "--no-eval", "--recipe", str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POSTTRAIN_PROGRESS": "0"}

    # Kill the whole process group once the sample stage has finished its first shard.
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", *args, "--run-dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(proc, (killed / "round_01" / "sample" / "samples", "shard_00000.jsonl"))
    rm_before = (killed / "round_01" / "rm" / "record.json").read_bytes()
    assert read_record(killed, 1, "sample") is None
    finished_shard = (killed / "round_01" / "sample" / "samples" / "shard_00000.jsonl").stat().st_mtime_ns

    rerun = cli(*args, "--run-dir", str(killed))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "round 1 rm: finished earlier, skipped" in rerun.stderr
    assert "round 1 sample: resuming" in rerun.stderr
    assert (killed / "round_01" / "rm" / "record.json").read_bytes() == rm_before
    # The finished shard was kept, not redone.
    assert (killed / "round_01" / "sample" / "samples" / "shard_00000.jsonl").stat().st_mtime_ns == finished_shard

    uninterrupted = cli(*args, "--run-dir", str(clean))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    def contents(outputs: dict) -> dict:
        """The outputs' paths, hashes and per-file sizes and hashes: not the files' mtimes, which
        differ between two runs by nature."""
        return {name: {**o, "files": {f: [size, digest] for f, (size, _mtime, digest) in o.get("files", {}).items()}}
                for name, o in outputs.items()}

    for stage in ("rm", "sample"):
        a, b = read_record(killed, 1, stage), read_record(clean, 1, stage)
        assert contents(a["outputs"]) == contents(b["outputs"]), f"{stage} outputs differ after a kill and resume"
    rows = [r["id"] for s in sorted((killed / "round_01" / "sample" / "samples").glob("shard_*.jsonl"))
            for r in iter_jsonl(s)]
    assert len(rows) == 24 == len(set(rows))
    for stage in STAGES:
        assert read_record(killed, 1, stage) is not None


def test_rm_placeholder_puts_the_rounds_reward_model_inside_a_combination():
    from posttrain.reward import WeightedReward, checked_score, load_reward
    from posttrain.rounds.orchestrator import fill_rm_placeholders

    class FakeRM:
        name = "rm"

        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    kwargs = {"components": [[{"target": "posttrain.world.task:TaskReward"}, 1.0], ["@rm", 0.01]]}
    filled = fill_rm_placeholders(kwargs, FakeRM)
    assert isinstance(filled["components"][1][0], FakeRM)
    assert kwargs["components"][1][0] == "@rm"  # the recipe's value is left as it was
    combo = load_reward({"target": "posttrain.reward:WeightedReward", "kwargs": filled})
    assert isinstance(combo, WeightedReward)
    prompts = [[{"role": "user", "content": "Sort these numbers: 3 1 2"}]] * 2
    assert checked_score(combo, prompts, ["1 2 3", "3 1 2"]) == pytest.approx([1.05, 0.05])


def test_validate_data_command_names_file_row_field_and_exits_1(tmp_path, capsys):
    from posttrain.cli import main

    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "", "rejected": "b"}\n'
                   + "".join('{"prompt": "x", "chosen": "a", "rejected": "b", "strength": "huge"}\n' for _ in range(60)))
    assert main(["validate-data", str(bad), "--kind", "preference"]) == 1
    out = capsys.readouterr().out
    assert "61 problem(s)" in out
    assert "prefs.jsonl: row 2: field 'chosen': must be a non-empty string" in out
    assert "field 'strength': unknown label 'huge'" in out
    assert "... and 11 more" in out
    assert main(["validate-data", str(bad), "--kind", "preference", "--all"]) == 1
    assert "row 62: field 'strength'" in capsys.readouterr().out
