"""scripts/check_demo.py, which CI runs after each demo loop: each loop's own claims, and a
message naming the claim that failed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import yaml

from posttrain.files import atomic_write_json

SPEC = importlib.util.spec_from_file_location("check_demo", Path(__file__).parent.parent / "scripts" / "check_demo.py")
check_demo = sys.modules["check_demo"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(check_demo)


def fake_run(run_dir: Path, name: str, scores: list[float], *, annotated: int = 5, variants: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": name}))
    for n, score in enumerate(scores, start=1):
        metrics = {"task_score": score, "initial_task_score": 0.5}
        if variants:
            metrics["variants"] = {"v0": {"task_score": score}, "v1": {"task_score": score}}
        atomic_write_json(run_dir / f"round_{n:02d}" / "eval" / "record.json", {"metrics": metrics})
        if n <= annotated:
            atomic_write_json(run_dir / f"round_{n:02d}" / "annotate" / "record.json",
                              {"metrics": {"labelled": 300, "rm_accuracy": {"accuracy": 0.75}}})
    return run_dir


def test_the_rm_loop_passes_when_it_rises_and_closes_60_percent(tmp_path, capsys):
    # Round 3 may sit a little below round 2 (a plateau seen through sampling noise), round 5 too.
    run = fake_run(tmp_path / "a", "demo", [0.6, 0.75, 0.72, 0.8, 0.79, 0.81])
    assert check_demo.check(run) == []
    assert "closes 62% of the gap" in capsys.readouterr().out


def test_each_failed_claim_is_named(tmp_path):
    run = fake_run(tmp_path / "b", "demo", [0.6, 0.6, 0.75, 0.7, 0.76, 0.77], annotated=3, variants=False)
    failures = check_demo.check(run)
    assert "round 2's task score 0.600 is not above round 1's 0.600" in failures
    assert "round 4's task score 0.700 is more than 0.04 below the best round before it (0.750)" in failures
    assert "round 6 closes 54% of the gap, less than 60%" in failures
    assert "round 4 annotated no batch" in failures and "round 5 annotated no batch" in failures
    assert "round 1's eval did not compare the averaged model with two variants" in failures
    run = fake_run(tmp_path / "b2", "demo", [0.6, 0.7, 0.69, 0.7, 0.8, 0.8])
    assert check_demo.check(run) == ["round 4's task score 0.700 is not above round 2's 0.700"]


def test_the_checker_loop_has_its_own_claims(tmp_path):
    scores = [0.6, 0.7, 0.72, 0.74, 0.76, 0.75]  # 50% of the gap; no annotation, no variants
    assert check_demo.check(fake_run(tmp_path / "c", "demo_checker", scores, annotated=0, variants=False)) == []
    assert check_demo.check(fake_run(tmp_path / "d", "demo_checker", [0.6, 0.7, 0.72, 0.74, 0.73, 0.8],
                                     annotated=0, variants=False)) == [
        "round 5's task score 0.730 is not above round 4's 0.740"]


def test_a_run_that_is_not_a_demo_loop_or_is_unfinished(tmp_path):
    assert "is not a demo loop" in check_demo.check(fake_run(tmp_path / "e", "general", [0.6] * 6))[0]
    assert check_demo.check(fake_run(tmp_path / "f", "demo", [0.6] * 5)) == ["round 6 has no eval record"]
