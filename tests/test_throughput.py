"""Throughput in every training record (posttrain.throughput): the FLOP formula against torch's
own FLOP counter, the GPU peak table, the CPU peak's cache, the meter's window, tiny rm / sft /
dpo runs, and what status and the report show."""

from __future__ import annotations

import json
import time

import pytest
import torch

from posttrain import throughput
from posttrain.files import atomic_write_json
from posttrain.stage import StageContext, headline

# ----------------------------------------------------------------------------- the FLOP formula


def _counted_flops(model, ids: torch.Tensor) -> int:
    """FLOPs torch counts (matmuls, attention) for one forward and backward of `ids`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


def test_six_n_matches_torchs_flop_count_for_full_training_and_lora(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from posttrain.world.tiny import make_tiny_model

    model = make_tiny_model(tiny_tokenizer, tie_word_embeddings=False)
    p = throughput.count_params(model)
    emb = model.get_input_embeddings().weight.numel()
    total = sum(q.numel() for q in model.parameters())
    # untied: the input embedding is a lookup; everything else (the output head included) multiplies
    assert p == {"trainable": total - emb, "frozen": 0, "reference": 0, "embedding_lookup": emb}
    assert throughput.flops_per_token(p) == 6 * (total - emb)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    # Attention's own products (not in the formula) are about 1% at 16 tokens.
    assert _counted_flops(model, ids) == pytest.approx(throughput.flops_per_token(p) * ids.numel(), rel=0.03)

    lora = get_peft_model(make_tiny_model(tiny_tokenizer, tie_word_embeddings=False),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    q = throughput.count_params(lora)
    adapters = sum(x.numel() for n, x in lora.named_parameters() if "lora_" in n)
    assert (q["trainable"], q["frozen"], q["embedding_lookup"]) == (adapters, total - emb, emb)
    # 4 x the frozen base (forward and activation gradients) + 6 x the adapters
    assert throughput.flops_per_token(q) == 4 * (total - emb) + 6 * adapters
    # torch skips the activation gradient of the first layer's q/k/v (their input, the frozen
    # embedding's output, needs none): 5% of this 2-layer model, 1/L of the input projections in general.
    assert _counted_flops(lora, ids) == pytest.approx(throughput.flops_per_token(q) * ids.numel(), rel=0.06)


def test_a_tied_embedding_multiplies_in_the_head_and_counts(tiny_tokenizer):
    from posttrain.world.tiny import make_tiny_model

    model = make_tiny_model(tiny_tokenizer)  # the world's tiny model ties them
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    p = throughput.count_params(model)
    assert p["embedding_lookup"] == 0 and p["trainable"] == sum(q.numel() for q in model.parameters())


def test_real_tokens_leave_padding_out():
    packed = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "segment_ids": torch.tensor([[0, 0, 1, 2, -1], [0, 1, -1, -1, -1]])}
    padded = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    flat = {"input_ids": torch.zeros(1, 7, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]])}
    assert [(int(r), n) for r, n in map(throughput.batch_tokens, (packed, padded, flat))] == [(6, 10), (4, 8), (7, 7)]
    with pytest.raises(KeyError, match="without input_ids"):
        throughput.batch_tokens({"pixel_values": torch.zeros(1)})


def test_the_window_leaves_checkpoint_saves_out():
    meter = throughput.Meter(throughput.Params(trainable=10, frozen=0, reference=0, embedding_lookup=0),
                             torch.device("cpu"))
    meter.count({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    meter.begin(0)
    time.sleep(0.05)
    meter.step_end(saving=True)
    time.sleep(0.3)  # "saving a checkpoint"
    meter.saved()
    meter.step_end(saving=False)
    meter.end(1)
    t = meter.totals
    assert 0.04 < t["seconds"] < 0.25 and t["steps"] == 1 and t["tokens"] == 6 and t["world_size"] == 1


# ----------------------------------------------------------------------------- peaks


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("AMD Instinct MI300X", 1307.4),
])
def test_known_gpus_have_their_datasheet_bf16_dense_peak(name, tflops):
    peak = throughput.gpu_peak(name)
    assert peak["flops_per_second"] == pytest.approx(tflops * 1e12)
    assert peak["kind"] == "gpu_bf16_dense" and "datasheet" in peak["source"] or "whitepaper" in peak["source"]


@pytest.mark.parametrize("name, why", [("NVIDIA A10G", "not in posttrain.throughput.GPU_BF16_PEAKS"),
                                       ("Tesla V100-SXM2-16GB", "no bf16 tensor cores")])
def test_an_unknown_gpu_has_no_peak_and_says_why(name, why):
    peak = throughput.gpu_peak(name)
    assert peak["flops_per_second"] is None and why in peak["reason"]


def test_cpu_peak_is_measured_once_then_read_and_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    real, calls = throughput.measure_gemm, []
    monkeypatch.setattr(throughput, "measure_gemm", lambda: calls.append(1) or real(n=128, reps=2))
    first = throughput.cpu_peak()
    path = throughput.cpu_peak_path(throughput.cpu_peak_key())
    assert len(calls) == 1 and path.parent == tmp_path / "throughput" and path.is_file()
    assert first["flops_per_second"] > 0 and first["flops_per_cpu_second"] > 0
    assert first["kind"] == "cpu_fp32_matmul" and str(path) in first["source"]
    assert throughput.cpu_peak() == first and len(calls) == 1  # the second call reads the cache
    stored = json.loads(path.read_text())
    assert stored["key"]["threads"] == torch.get_num_threads() and stored["key"]["torch"] == torch.__version__
    for damaged in ("{not json", json.dumps({**stored, "flops_per_second": -1.0}),
                    json.dumps({**stored, "flops_per_second": "fast"}), json.dumps([1, 2]),
                    json.dumps({k: v for k, v in stored.items() if k != "flops_per_cpu_second"}),  # version 1
                    json.dumps({**stored, "key": {**stored["key"], "cpu": "another"}})):
        path.write_text(damaged)
        before = len(calls)
        again = throughput.cpu_peak()
        assert len(calls) == before + 1 and again["flops_per_second"] > 0
        assert json.loads(path.read_text())["key"] == stored["key"]  # rewritten whole
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another thread count is another peak
        assert throughput.cpu_peak_path(throughput.cpu_peak_key()) != path
    finally:
        torch.set_num_threads(threads)


def test_a_real_gemm_timing_is_quick_and_positive():
    t = time.perf_counter()
    m = throughput.measure_gemm(n=256, reps=3)
    assert m["flops_per_second"] > 1e6 and m["reps"] == 3 and time.perf_counter() - t < 5


# ----------------------------------------------------------------------------- tiny stage runs


def _prefs(path, n=8):
    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"sort {i} 3 1"}],
             "chosen": f"1 3 {i}", "rejected": f"{i} {i}", "strength": "better"} for i in range(4, 4 + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(t: dict, steps: int):
    assert t["world_size"] == 1 and t["device"] == "cpu" and t["steps"] == steps
    assert 0 < t["tokens"] <= t["tokens_with_padding"]
    assert t["seconds"] > 0 and t["cpu_seconds"] > 0
    assert t["tokens_per_second"] == pytest.approx(t["tokens"] / t["seconds"], rel=1e-3)
    assert t["tokens_per_cpu_second"] == pytest.approx(t["tokens"] / t["cpu_seconds"], rel=1e-3)
    assert t["flops"] == t["flops_per_token"] * t["tokens"]
    assert t["peak"]["kind"] == "cpu_fp32_matmul" and t["peak_flops_per_second"] > 0
    assert 0 < t["mfu"] <= 1.5 and 0 < t["mfu_cpu_time"] <= 1.5
    assert t["mfu"] == pytest.approx(t["flops_per_second"] / t["peak_flops_per_second"], rel=1e-4)


def test_a_tiny_sft_run_records_its_throughput_over_real_tokens(tiny_tokenizer, tiny_model_dir, tmp_path):
    from posttrain import data
    from posttrain.stages import sft

    rows = [{"messages": [{"role": "user", "content": f"sort {i} {i + 3} 1"},
                          {"role": "assistant", "content": f"1 {i} " * (i - 1)}]} for i in range(2, 9)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sft.SFTStageConfig(batch_size=3, learning_rate=1e-3, epochs=1, save_steps=2, logging_steps=1,
                             max_length=128, variants=[{}, {"seed": 4}])
    run_dir = tmp_path / "run"
    ctx = StageContext(stage="sft", round=1, run_dir=run_dir, out_dir=run_dir / "round_01" / "sft", config=cfg,
                       inputs={"init_model": str(tiny_model_dir), "sft_files": [str(tmp_path / "sft.jsonl")]})
    m = sft.run(ctx).metrics
    encoded, _ = sft.training_rows(tiny_tokenizer, [], data.load_sft([str(tmp_path / "sft.jsonl")]), cfg)
    for v in m["variants"].values():
        _check(v["throughput"], steps=v["steps"])
        assert v["throughput"]["tokens"] == sum(len(r["input_ids"]) for r in encoded)  # every row once, no padding
        assert v["throughput"]["tokens_with_padding"] > v["throughput"]["tokens"]  # rows of other lengths
        p = v["throughput"]["params"]
        assert p["frozen"] == p["reference"] == 0 and v["throughput"]["flops_per_token"] == 6 * p["trainable"]
    stage = m["throughput"]  # the variants together
    _check(stage, steps=sum(v["steps"] for v in m["variants"].values()))
    assert stage["tokens"] == sum(v["throughput"]["tokens"] for v in m["variants"].values())
    assert stage["seconds"] == pytest.approx(sum(v["throughput"]["seconds"] for v in m["variants"].values()))
    assert [k for k, _ in headline("sft", m)] == ["loss", "examples", "tok/s", "mfu"]


def test_a_tiny_rm_run_records_its_throughput(tiny_model_dir, tmp_path):
    from posttrain.stages import rm

    cfg = rm.RMConfig(learning_rate=1e-3, epochs=1, batch_size=4, save_steps=1000, logging_steps=1,
                      min_heldout_accuracy=0)
    held = _prefs(tmp_path / "held.jsonl", 2)
    ctx = StageContext(stage="rm", round=1, run_dir=tmp_path / "run", out_dir=tmp_path / "run" / "round_01" / "rm",
                       config=cfg, inputs={"base_model": str(tiny_model_dir),
                                           "preference_files": [str(_prefs(tmp_path / "p.jsonl"))],
                                           "heldout_preference_files": [str(held)]})
    m = rm.run(ctx).metrics
    t = m["throughput"]
    _check(t, steps=m["variants"]["v0"]["steps"])
    # a sequence classifier: the input embedding is only looked up, the score head multiplies
    assert t["params"]["embedding_lookup"] > 0 and t["flops_per_token"] == 6 * t["params"]["trainable"]
    assert [k for k, _ in headline("rm", m)][-2:] == ["tok/s", "mfu"]


@pytest.mark.parametrize("precompute_ref", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_tiny_dpo_run_counts_a_live_reference_forward(tiny_model_dir, tmp_path, precompute_ref):
    from posttrain.stages import dpo

    cfg = dpo.DPOStageConfig(batch_size=4, learning_rate=1e-3, epochs=1, save_steps=1000, logging_steps=1,
                             max_length=128, precompute_ref=precompute_ref)
    ctx = StageContext(stage="dpo", round=1, run_dir=tmp_path / "run", out_dir=tmp_path / "run" / "round_01" / "dpo",
                       config=cfg, inputs={"sft_model": str(tiny_model_dir),
                                           "preference_files": [str(_prefs(tmp_path / "p.jsonl"))]})
    m = dpo.run(ctx).metrics
    t = m["throughput"]
    _check(t, steps=2)
    dense = t["params"]["trainable"]
    # precomputed: the reference pass ran before the loop; live: a forward of the whole model per token
    assert t["params"]["reference"] == (0 if precompute_ref else dense)
    assert t["flops_per_token"] == (6 if precompute_ref else 8) * dense
    assert [k for k, _ in headline("dpo", m)] == ["acc", "pairs", "tok/s", "mfu"]


# ----------------------------------------------------------------------------- status and report


def _tp(tokens, seconds, mfu, device="cpu", world=1, peak=None):
    return {"device": device, "world_size": world, "tokens": tokens, "tokens_with_padding": tokens + 10,
            "seconds": seconds, "cpu_seconds": 2 * seconds, "tokens_per_second": tokens / seconds,
            "tokens_per_cpu_second": tokens / (2 * seconds) if device == "cpu" else None,
            "flops_per_second": 1.5e11, "peak_flops_per_second": None if mfu is None else 1.5e11 / mfu, "mfu": mfu,
            "mfu_cpu_time": 2 * mfu if device == "cpu" else None,
            "peak": peak or {"flops_per_second": 1e11, "device": "cpu: Test CPU, 2 threads", "kind": "cpu_fp32_matmul",
                             "source": "measured here: best of 5 fp32 2048x2048 torch.mm", "reason": None}}


def test_status_and_report_show_tokens_per_second_and_mfu(tmp_path):
    from posttrain.api import status_table
    from posttrain.report import throughput_rows, write_report

    gpu = {"flops_per_second": None, "device": "NVIDIA A10G", "kind": None, "source": None,
           "reason": "'NVIDIA A10G' is not in posttrain.throughput.GPU_BF16_PEAKS"}
    metrics = {"rm": {"heldout": {"accuracy": 0.8}, "rankings": 10, "throughput": _tp(52_340, 10.0, 0.031)},
               "sft": {"rows_trained": 5, "throughput": _tp(99, 1.5, 0.0004)},
               "dpo": {"pairs": 4, "throughput": _tp(8000, 2.0, None, device="cuda", world=2, peak=gpu)},
               "eval": {"task_score": 0.5}}
    for step, m in metrics.items():
        atomic_write_json(tmp_path / "round_01" / step / "record.json",
                          {"stage": step, "round": 1, "outputs": {}, "metrics": m, "timing": {"seconds": 3.0}})
    row = status_table(tmp_path).splitlines()[2]
    for cell in ("rankings=10 tok/s=5234 mfu=3.1%", "examples=5 tok/s=66 mfu=0.04%", "pairs=4 tok/s=4000"):
        assert cell in row
    assert "mfu: achieved FLOP/s" in status_table(tmp_path)  # the legend says what it is
    rows, sources = throughput_rows({1: {s: {"metrics": m} for s, m in metrics.items()}})
    assert rows == [
        ["1", "rm", "cpu", "52340", "52350", "10.0", "5,234.0", "2,617.0", "150 GFLOP/s", "4.84 TFLOP/s", "3.1%",
         "6.2%"],
        ["1", "sft", "cpu", "99", "109", "1.5", "66.0", "33.0", "150 GFLOP/s", "375 TFLOP/s", "0.04%", "0.08%"],
        ["1", "dpo", "cuda x2", "8000", "8010", "2.0", "4,000.0", "-", "150 GFLOP/s", "-", "-", "-"]]
    assert sources == ["cpu: Test CPU, 2 threads: measured here: best of 5 fp32 2048x2048 torch.mm",
                       "NVIDIA A10G: 'NVIDIA A10G' is not in posttrain.throughput.GPU_BF16_PEAKS"]
    text = write_report(tmp_path).read_text()
    assert "## Training throughput" in text and "| 1 | rm | cpu | 52340 | 52350 | 10.0 | 5,234.0 |" in text
    assert "Peaks: cpu: Test CPU" in text


def test_records_without_throughput_show_nothing_new(tmp_path):
    from posttrain.report import write_report

    atomic_write_json(tmp_path / "round_01" / "sft" / "record.json",
                      {"stage": "sft", "round": 1, "outputs": {}, "metrics": {"rows_trained": 3},
                       "timing": {"seconds": 1.0}})
    assert "throughput" not in write_report(tmp_path).read_text()
    assert headline("sft", {"rows_trained": 3}) == [("examples", 3)]
    assert throughput.combine([None, None]) is None
