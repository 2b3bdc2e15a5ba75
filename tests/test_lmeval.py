"""eval.benchmarks `lm_eval`: lm-evaluation-harness tasks run by lm-eval on the round's model, its
numbers parsed into eval's record, and its mistakes found by `posttrain validate`."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.benchmarks import Benchmark, BenchmarkError, main_metric, settings_text
from posttrain.files import iter_jsonl, read_json
from posttrain.lmeval import numbers_from_results, task_facts
from posttrain.stage import headline

ROWS = [{"question": f"Sort these numbers: {a} {b} {c}", "answer": " ".join(map(str, sorted((a, b, c)))),
         "choices": [" ".join(map(str, sorted((a, b, c)))), f"{a} {b} {c}", f"{c} {b} {a}"], "label": 0}
        for a, b, c in [(3, 1, 2), (9, 4, 7), (5, 5, 0), (8, 2, 6), (1, 0, 4), (7, 3, 3)]]


def write_tasks(folder: Path) -> Path:
    """A local multiple-choice task (loglikelihood) and a generate_until task (exact match) over
    one JSONL, named by a path relative to the YAMLs' folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sort.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "sort.jsonl"}}, "test_split": "test",
              "doc_to_text": "{{question}}"}
    (folder / "sort_mc.yaml").write_text(yaml.safe_dump({
        "task": "sort_mc", **common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
        "doc_to_target": "label", "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    (folder / "sort_gen.yaml").write_text(yaml.safe_dump({
        "task": "sort_gen", **common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return folder


def test_lm_evals_numbers_parsed_by_hand():
    """Every metric and its stderr, by task; a filter other than `none` stays in the name; lm-eval's
    "N/A" stderr becomes None; a group's aggregate counts as a task."""
    results = {"results": {"gsm": {"alias": "gsm",
                                   "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                                   "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"},
                           "mc": {"alias": "mc", "sample_len": 10, "acc,none": 0.3, "acc_stderr,none": 0.05,
                                  "acc_norm,none": 0.4, "acc_norm_stderr,none": 0.06}},
               "groups": {"grp": {"alias": "grp", "acc,none": 0.35, "acc_stderr,none": 0.04}},
               "n-samples": {"gsm": {"original": 20, "effective": 8}, "mc": {"original": 10, "effective": 10}},
               "n-shot": {"gsm": 5, "mc": 0}, "versions": {"gsm": 3.0, "mc": "Yaml"},
               "higher_is_better": {"gsm": {"exact_match": True}, "mc": {"acc": True, "acc_norm": True}}}
    numbers = numbers_from_results(results)
    assert numbers == {"gsm/exact_match,strict-match": 0.25, "gsm/exact_match_stderr,strict-match": 0.1,
                       "gsm/exact_match,flexible-extract": 0.5, "gsm/exact_match_stderr,flexible-extract": None,
                       "mc/acc": 0.3, "mc/acc_stderr": 0.05, "mc/acc_norm": 0.4, "mc/acc_norm_stderr": 0.06,
                       "grp/acc": 0.35, "grp/acc_stderr": 0.04}
    assert main_metric("lm_eval", numbers) == "gsm/exact_match,strict-match"
    assert task_facts(results)["gsm"] == {"documents": 8, "num_fewshot": 5, "version": 3.0,
                                          "higher_is_better": {"exact_match": True}}


def test_lm_eval_settings_are_checked_in_the_recipe():
    ok = Benchmark(name="lm_eval", tasks=["a", "b"], include_path="tasks", num_fewshot=5, max_problems=10)
    assert ok.label == "lm_eval:a+b" and ok.file_name == "lm_eval_a+b.jsonl"
    with pytest.raises(ValueError, match="names at least one lm-eval task"):
        Benchmark(name="lm_eval")
    with pytest.raises(ValueError, match="`temperature` is posttrain's own generation setting"):
        Benchmark(name="lm_eval", tasks=["a"], temperature=0.7)
    with pytest.raises(ValueError, match="`tasks` is a setting of lm_eval benchmarks only"):
        Benchmark(name="humaneval", tasks=["a"])
    with pytest.raises(ValueError, match="not a task name"):
        Benchmark(name="lm_eval", tasks=["mmlu_*"])
    with pytest.raises(ValueError, match="`pretrained` and `tokenizer` are the round's checkpoint"):
        Benchmark(name="lm_eval", tasks=["a"], model_args={"pretrained": "x"})
    from posttrain.recipe import Recipe

    with pytest.raises(ValueError, match=r"eval.benchmarks\[0\].capability: 'code' is not in capabilities"):
        Recipe(name="t", models={"base": "m"}, eval={"benchmarks": [{"name": "lm_eval", "tasks": ["a"],
                                                                    "capability": "code"}]})
    assert "num_fewshot=task default, limit=None, chat template on" in settings_text(
        {**Benchmark(name="lm_eval", tasks=["a"]).model_dump(), "lm_eval_version": "0.4.13"})


def _recipe(tmp_path: Path, bench: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "models": {"base": "some/model"}, "eval": {"benchmarks": [bench]}}))
    return path


def test_validate_knows_local_tasks_and_names_a_missing_folder(tmp_path):
    pytest.importorskip("lm_eval")
    from posttrain import lmeval
    from posttrain.recipe import RecipeError, load_recipe

    write_tasks(tmp_path / "tasks")
    good = load_recipe(_recipe(tmp_path, {"name": "lm_eval", "tasks": ["sort_mc", "sort_gen"],
                                          "include_path": "tasks"}))
    good.check(files=False)
    assert lmeval.check(good.base.eval.benchmarks[0], str(tmp_path / "tasks"), "k") == []
    with pytest.raises(RecipeError, match=r"eval.benchmarks\[0\].include_path: .*nowhere.*: no such folder"):
        load_recipe(_recipe(tmp_path, {"name": "lm_eval", "tasks": ["sort_mc"], "include_path": "nowhere"})).check()


@pytest.mark.slow
def test_validate_names_an_unknown_task(tmp_path):
    """A name neither the include_path nor lm-eval defines (about 20 s on a loaded machine:
    lm-eval's own 15k task names are indexed to be sure)."""
    pytest.importorskip("lm_eval")
    from posttrain import lmeval
    from posttrain.recipe import load_recipe

    write_tasks(tmp_path / "tasks")
    bad = load_recipe(_recipe(tmp_path, {"name": "lm_eval", "tasks": ["sort_mc", "sort_typo"],
                                         "include_path": "tasks"}))
    assert lmeval.check(bad.base.eval.benchmarks[0], str(tmp_path / "tasks"), "eval.benchmarks[0]") == [
        f"eval.benchmarks[0].tasks: 'sort_typo' is not a task in {tmp_path / 'tasks'} (sort_gen, sort_mc) "
        "or among lm-eval's own tasks"]
    assert lmeval.check(Benchmark(name="lm_eval", tasks=["arc_easy"]), None, "k") == []  # one of lm-eval's own


def test_validate_without_lm_eval_is_one_line(tmp_path, monkeypatch):
    from posttrain.recipe import RecipeError, load_recipe

    loaded = load_recipe(_recipe(tmp_path, {"name": "lm_eval", "tasks": ["sort_mc"]}))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(RecipeError) as err:
        loaded.check(files=False)
    assert str(err.value) == (f"{tmp_path / 'r.yaml'}: eval.benchmarks[0]: lm_eval needs the lm-eval package: "
                              ".venv/bin/python -m pip install -r requirements/lmeval.txt")


def _ctx(tmp_path, model_dir, tasks_dir, specs, round_n=1, capabilities=None):
    from posttrain.recipe import EvalSettings, Recipe
    from posttrain.stage import StageContext

    cfg = EvalSettings(backend="transformers", benchmarks=specs)
    recipe = Recipe(name="t", models={"base": str(model_dir)}, eval=cfg.model_dump(),
                    capabilities=capabilities or {})
    return StageContext(stage="eval", round=round_n, run_dir=tmp_path, out_dir=tmp_path / f"round_0{round_n}" / "eval",
                        config=cfg, recipe=recipe,
                        inputs={"final_model": str(model_dir), "reward_model": str(model_dir),
                                "initial_model": str(model_dir), "prompt_files": [],
                                "benchmark_files": [str(tasks_dir)],
                                "capabilities": capabilities or {}})


def _stderr_of_mean(values: list[float]) -> float:
    n, m = len(values), sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def test_eval_stage_records_lm_evals_numbers(tmp_path, tiny_model_dir, monkeypatch, caplog, capfd):
    """The tiny model on a local multiple-choice and generate_until task through eval's benchmark
    step (round 2: the round's model only): lm-eval's numbers equal the mean and stderr of its
    per-sample verdicts, the settings are recorded, the capability's system prompt is the system
    turn, and a resumed eval reuses the results."""
    pytest.importorskip("lm_eval")
    from posttrain import lmeval
    from posttrain.stages import eval as eval_stage

    caplog.set_level(logging.DEBUG, logger="posttrain")
    tasks = write_tasks(tmp_path / "tasks")
    spec = {"name": "lm_eval", "tasks": ["sort_mc", "sort_gen"], "include_path": str(tasks), "capability": "math",
            "max_problems": 5}
    ctx = _ctx(tmp_path, tiny_model_dir, tasks, [spec], round_n=2,
               capabilities={"math": {"system_prompt": "Answer with the numbers only."}})
    got = eval_stage.run_benchmarks(ctx, ctx.out_dir)["lm_eval:sort_mc+sort_gen"]
    assert "initial" not in got and got["problems"] == 10
    samples = list(iter_jsonl(ctx.out_dir / "benchmarks" / "model" / "lm_eval_sort_mc+sort_gen.jsonl"))
    for task, metric in (("sort_mc", "acc"), ("sort_gen", "exact_match")):
        verdicts = [s[metric] for s in samples if s["task"] == task]
        assert len(verdicts) == 5 and got["tasks"][task]["documents"] == 5
        assert got["numbers"][f"{task}/{metric}"] == pytest.approx(sum(verdicts) / 5)
        assert got["numbers"][f"{task}/{metric}_stderr"] == pytest.approx(_stderr_of_mean(verdicts))
    context = samples[0]["arguments"][0][0]  # the chat template's rendering, system turn first
    assert context.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                              "Answer with the numbers only.")
    s = got["settings"]
    assert s["lm_eval_version"] == "0.4.13" and s["apply_chat_template"]
    assert s["system_instruction"].startswith("Answer")
    assert s["model_args"] == {"dtype": "float32"} and s["seeds"]["fewshot_seed"] == 1234 and s["max_problems"] == 5
    # lm-eval's own output: in its log file and the run's log (posttrain's logger), not on the terminal
    said = (ctx.out_dir / "benchmarks" / "model" / "lm_eval_sort_mc+sort_gen.log").read_text()
    assert "Running loglikelihood requests" in said
    bars = [r.getMessage() for r in caplog.records if "Running loglikelihood requests:" in r.getMessage()]
    assert "100%" in bars[-1] and not any("\r" in m for m in bars)  # redraws are not one long line
    terminal = capfd.readouterr()
    assert "loglikelihood" not in terminal.out + terminal.err and "fatal" not in terminal.err
    shown = dict(headline("eval", {"task_score": None, "mean_reward": 0.5, "win_rate_vs_previous": None,
                                   "benchmarks": {"lm_eval:sort_mc+sort_gen": got}}))
    assert shown["lm_eval:sort_mc/acc"] == got["numbers"]["sort_mc/acc"]
    monkeypatch.setattr(lmeval, "run_job", lambda *a, **k: pytest.fail("ran lm-eval again"))
    assert eval_stage.run_benchmarks(ctx, ctx.out_dir)["lm_eval:sort_mc+sort_gen"] == got
    assert read_json(ctx.out_dir / "benchmarks" / "model" / "lm_eval_sort_mc+sort_gen.results.json")["results"]


@pytest.mark.slow
def test_a_hub_task_offline_fails_naming_the_task(tmp_path, tiny_model_dir, monkeypatch):
    """lm-eval's own `arc_easy` with HF_HUB_OFFLINE=1 and no local copy of its dataset: one
    error naming the task, from the child (about 15 s: lm-eval indexes its own tasks)."""
    pytest.importorskip("lm_eval")
    from posttrain.stages import eval as eval_stage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty datasets cache
    tasks = write_tasks(tmp_path / "tasks")
    ctx = _ctx(tmp_path, tiny_model_dir, tasks, [{"name": "lm_eval", "tasks": ["sort_mc", "arc_easy"],
                                                  "include_path": str(tasks)}], round_n=2)
    with pytest.raises(BenchmarkError, match=r"task 'arc_easy': its dataset could not be read offline"):
        eval_stage.run_benchmarks(ctx, ctx.out_dir)


def test_report_shows_lm_evals_numbers_with_their_settings(tmp_path):
    from posttrain.files import atomic_write_json
    from posttrain.report import benchmark_tables, collect, write_report

    settings = {**Benchmark(name="lm_eval", tasks=["sort_mc"], num_fewshot=3).model_dump(mode="json"),
                "lm_eval_version": "0.4.13"}
    for n, acc in ((1, 0.5), (2, 0.75)):
        bench = {"lm_eval:sort_mc": {"numbers": {"sort_mc/acc": acc, "sort_mc/acc_stderr": 0.1},
                                     "initial": {"sort_mc/acc": 0.25, "sort_mc/acc_stderr": 0.09} if n == 1 else None,
                                     "problems": 20, "settings": settings}}
        atomic_write_json(tmp_path / f"round_0{n}" / "eval" / "record.json",
                          {"stage": "eval", "round": n, "outputs": {}, "metrics": {"benchmarks": bench},
                           "timing": {"seconds": 1.0}})
    how = "lm-eval 0.4.13, hf, num_fewshot=3, limit=None, chat template on"
    assert benchmark_tables(collect(tmp_path)) == {"lm_eval:sort_mc": (["sort_mc/acc", "sort_mc/acc_stderr"], [
        [0, 0.25, 0.09, 20, how], [1, 0.5, 0.1, 20, how], [2, 0.75, 0.1, 20, how]])}
    text = write_report(tmp_path).read_text()
    assert "## Benchmark: lm_eval:sort_mc" in text and "| 2 | 0.750 | 0.100 | 20 |" in text
    assert (tmp_path / "report" / "benchmarks.png").is_file()


@pytest.mark.slow
def test_decontamination_checks_an_lm_eval_task_folders_prompts(tmp_path):
    """An lm_eval benchmark's include_path joins the prompt sets training data is checked
    against, its documents rendered by lm-eval (doc_to_text): an SFT row that copies one of the
    task's questions is caught; its own include_path is the set's name (about 25 s on a loaded
    machine: lm-eval starts in a child)."""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from posttrain.decontam import prompt_sets, resolve_inputs
    from posttrain.recipe import Recipe
    from posttrain.data import SFTExample
    from posttrain.stages.sft import screen_examples

    tasks = write_tasks(tmp_path / "tasks")
    long_rows = [{**r, "question": f"Please sort these numbers for me in rising order now: {r['question'][-5:]}"}
                 for r in ROWS]
    (tasks / "sort.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    recipe = Recipe.model_validate({"name": "t", "models": {"base": "x/y"}, "decontaminate": "drop",
                                    "eval": {"benchmarks": [{"name": "lm_eval", "tasks": ["sort_mc"],
                                                             "include_path": str(tasks)}]}})
    got = resolve_inputs(SimpleNamespace(recipe=recipe, path=lambda p: p))
    assert got["eval_prompt_files"] == [str(tasks)]
    (name, texts), = prompt_sets(got["eval_prompt_files"])  # both tasks of the folder, 6 documents each
    assert name == str(tasks) and len(texts) == 12 and texts[0] == long_rows[0]["question"]

    def conv(user):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]

    rows = [SFTExample("copy", conv("Q: " + long_rows[2]["question"]), source="sft.jsonl:1"),
            SFTExample("own", conv("Sort 3 1 2"), source="sft.jsonl:2")]
    kept, counts = screen_examples(SimpleNamespace(**got), rows)
    assert [r.id for r in kept] == ["own"] and counts == {"sft.jsonl": 1}
