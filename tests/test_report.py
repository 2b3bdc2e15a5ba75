"""The report shows the reward model's health and what each stage trained on, from the records."""

from __future__ import annotations

from posttrain.report import data_rows, reason_rows, rm_health_rows, variant_rows, write_report
from posttrain.files import atomic_write_json
from posttrain.samples import shard_path, write_shard

RM = {"heldout": {"accuracy": 0.349, "pairs": 43, "accuracy_chosen_shorter": 0.2, "pairs_chosen_shorter": 20,
                  "prefers_longer": 0.58, "score_length_correlation": 0.46, "min_accuracy": 0.3},
      "unit": "pairs", "rows_read": 400, "rows_trained": 280, "rows_trained_by_variant": {"v0": 280},
      "dropped": {"too_long": 102, "held_out": 18}, "truncated": 0}
SAMPLE = {"prompts_read": 32, "prompts": 32, "top1": 21, "prompts_without_top1": 11,
          "too_long": {"count": 0, "ids": []}, "skipped_by_capability": 0, "score_length_correlation": 0.41}
SFT = {"unit": "examples", "rows_read": 221, "rows_trained": 171, "rows_trained_by_variant": {"v0": 171, "v1": 86},
       "dropped": {"prompt_too_long": 50}, "truncated": 12}


def test_health_and_data_tables_from_the_records():
    records = {1: {"rm": {"metrics": RM}, "sample": {"metrics": SAMPLE}, "sft": {"metrics": SFT}}}
    assert rm_health_rows(records) == [
        ["1", "0.349", "43", "0.200 (20 pairs)", "0.580", "0.460", "0.410", "0.300", "-"]]
    assert data_rows(records) == [
        ["1", "rm", "pairs", "400", "280", "too_long 102, held_out 18", "0"],
        ["1", "sample", "prompts", "32", "21 top-1", "no_top1 11", "-"],
        ["1", "sft", "examples", "221", "171 (v0 171, v1 86)", "prompt_too_long 50", "12"],
    ]


def test_write_report_has_both_sections(tmp_path):
    for stage, metrics in (("rm", RM), ("sft", SFT)):
        atomic_write_json(tmp_path / "round_01" / stage / "record.json",
                          {"stage": stage, "round": 1, "outputs": {}, "metrics": metrics,
                           "timing": {"seconds": 3.0}})
    text = write_report(tmp_path).read_text()
    assert "## Reward model health" in text and "| 1 | 0.349 | 43 | 0.200 (20 pairs) |" in text
    assert "## Data per stage" in text and "| 1 | sft | examples | 221 | 171 (v0 171, v1 86) |" in text


EVAL = {"task_score": 0.81, "mean_reward": 1.2, "average_minus_best_variant": 0.02,
        "variants": {"v0": {"task_score": 0.79, "mean_reward": 1.1}, "v1": {"task_score": 0.75, "mean_reward": 0.9}}}


def test_the_averaged_model_against_each_variant():
    records = {1: {"eval": {"metrics": EVAL}}, 2: {"eval": {"metrics": {"task_score": 0.9}}}}
    assert variant_rows(records) == (["v0", "v1"], [["1", "0.810", "0.790", "0.750", "0.020"]])


def test_without_variants_the_report_has_no_variant_section(tmp_path):
    atomic_write_json(tmp_path / "round_01" / "eval" / "record.json",
                      {"stage": "eval", "round": 1, "outputs": {}, "metrics": {"task_score": 0.5}})
    assert "its variants" not in write_report(tmp_path).read_text()
    atomic_write_json(tmp_path / "round_02" / "eval" / "record.json",
                      {"stage": "eval", "round": 2, "outputs": {}, "metrics": EVAL})
    text = write_report(tmp_path).read_text()
    assert "## The averaged model and its variants" in text and "| 2 | 0.810 | 0.790 | 0.750 | 0.020 |" in text


def test_the_share_of_samples_per_scoring_reason_each_round(tmp_path):
    records = {1: {"sample": {"metrics": {"reasons": {"failed": 6, "passed": 2}}}},
               2: {"sample": {"metrics": {"reasons": {"passed": 6, "timeout": 1, "failed": 1}}}},
               3: {"rm": {"metrics": RM}}}
    assert reason_rows(records) == (["passed", "failed", "timeout"],
                                    [["1", "8", "25.0%", "75.0%", "0.0%"], ["2", "8", "75.0%", "12.5%", "12.5%"]])
    for n, recs in records.items():
        for stage, rec in recs.items():
            outputs = {"samples": {"path": f"round_{n:02d}/sample/samples"}} if stage == "sample" else {}
            write_shard(shard_path(tmp_path / f"round_{n:02d}" / stage / "samples", 0), [])
            atomic_write_json(tmp_path / f"round_{n:02d}" / stage / "record.json",
                              {"stage": stage, "round": n, "outputs": outputs, "timing": {"seconds": 1.0}, **rec})
    text = write_report(tmp_path).read_text()
    assert "## Why sampled responses scored what they did" in text
    assert "| round | responses | passed | failed | timeout |" in text and "| 2 | 8 | 75.0% | 12.5% | 12.5% |" in text


def test_a_table_and_a_plot_per_benchmark(tmp_path):
    from posttrain.report import benchmark_tables

    how = {"n": 1, "temperature": 0.0, "max_new_tokens": 512}
    he = lambda numbers, initial=None: {"humaneval": {"numbers": numbers, "initial": initial, "problems": 164,  # noqa: E731
                                                      "settings": how}}
    for n, bench in ((1, he({"pass@1": 0.25}, {"pass@1": 0.125})), (2, he({"pass@1": 0.5}))):
        atomic_write_json(tmp_path / f"round_0{n}" / "eval" / "record.json",
                          {"stage": "eval", "round": n, "outputs": {}, "metrics": {"benchmarks": bench},
                           "timing": {"seconds": 1.0}})
    from posttrain.report import collect

    assert benchmark_tables(collect(tmp_path)) == {"humaneval": (["pass@1"], [
        [0, 0.125, 164, "n=1, temperature=0.0, max_new_tokens=512"],
        [1, 0.25, 164, "n=1, temperature=0.0, max_new_tokens=512"],
        [2, 0.5, 164, "n=1, temperature=0.0, max_new_tokens=512"]])}
    text = write_report(tmp_path).read_text()
    assert "## Benchmark: humaneval" in text and "| 0 | 0.125 | 164 |" in text and "| 2 | 0.500 | 164 |" in text
    assert (tmp_path / "report" / "benchmarks.png").is_file() and "![benchmarks.png]" in text
