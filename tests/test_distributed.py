"""Training stages on several processes (2 gloo ranks on the CPU), through the stage worker.

The invariant: 2 processes x per-device batch b/2 train the same model as 1 process x b
(the same samples in each optimizer step), within float-summation noise. Also: only rank 0
writes and the others wait for it; the launcher is resolved in posttrain's own environment
and settings that would silently start one process are refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.files import write_jsonl
from posttrain.launch import LaunchError, check_world_size, plan_launch

HELPER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN_2 = ["torchrun", "--standalone", "--nproc_per_node", "2"]


# ------------------------------------------------------------------------------ launch plans (fast)


def test_launchers_resolve_to_this_python():
    plan = plan_launch(["accelerate", "launch", "--multi_gpu", "--num_processes", "2"], has_gpu=False)
    assert plan.command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert (plan.world_size, plan.parallelism) == (2, "ddp")
    plan = plan_launch(["/some/other/env/bin/torchrun", "--nproc-per-node=4", "--nnodes", "2"], has_gpu=False)
    assert plan.command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert plan.world_size == 8
    assert plan_launch(None).command == [sys.executable] and plan_launch(None).world_size == 1


@pytest.mark.parametrize("launcher, message", [
    (["accelerate", "launch", "--cpu", "--num_processes", "2"], "ONE process"),
    (["accelerate", "launch", "--num_processes", "2"], "ONE process"),
    (["accelerate", "launch", "--use_fsdp", "--num_processes", "2"], "needs GPUs"),
    (["torchrun", "-m"], "--nproc_per_node"),
    (["torchrun", "--nproc_per_node", "gpu"], "must be a number"),
    (["mpirun", "-n", "2"], "neither"),
])
def test_settings_that_would_silently_run_otherwise_are_refused(launcher, message):
    with pytest.raises(LaunchError, match=message):
        plan_launch(launcher, has_gpu=False)


def test_world_size_comes_from_the_accelerate_config_beside_the_recipe(tmp_path):
    (tmp_path / "fsdp.yaml").write_text("distributed_type: FSDP\nnum_processes: 8\n")
    plan = plan_launch(["accelerate", "launch", "--config_file", "fsdp.yaml"], base_dir=tmp_path, has_gpu=True)
    assert (plan.world_size, plan.parallelism, plan.config_file) == (8, "fsdp", tmp_path / "fsdp.yaml")
    assert str(tmp_path / "fsdp.yaml") in plan.command
    ident = plan.identity(lambda p: {"path": p, "sha256": "x"})
    assert ident["world_size"] == 8 and ident["config"]["sha256"] == "x"


@pytest.mark.parametrize("name, parallelism", [("multi_gpu", "ddp"), ("fsdp2", "fsdp"), ("zero3", "deepspeed")])
def test_shipped_accelerate_configs_parse_and_plan(name, parallelism):
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    assert path.read_text().startswith("# ")  # each opens with what it is and the command that uses it
    assert f"configs/accelerate/{name}.yaml" in path.read_text()
    load_config_from_file(str(path))  # accelerate itself accepts it
    plan = plan_launch(["accelerate", "launch", "--config_file", str(path)], has_gpu=True)
    assert (plan.world_size, plan.parallelism) == (8, parallelism)
    plan = plan_launch(["accelerate", "launch", "--config_file", str(path), "--num_processes", "2"], has_gpu=True)
    assert plan.world_size == 2
    if parallelism != "ddp":
        with pytest.raises(LaunchError, match="needs GPUs"):
            plan_launch(["accelerate", "launch", "--config_file", str(path)], has_gpu=False)


def test_the_worker_refuses_a_world_other_than_planned(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(LaunchError, match="started 1 process"):
        check_world_size(2, ["accelerate", "launch", "--cpu", "--num_processes", "2"])
    check_world_size(1, None)


def test_a_changed_launcher_is_a_changed_input_and_shows_in_status(tmp_path, tiny_model_dir, monkeypatch):
    import yaml

    from posttrain.api import status_table
    from posttrain.records import InputsChanged, read_record
    from posttrain.recipe import load_recipe
    from posttrain.rounds.orchestrator import Round

    prefs = _preferences(tmp_path / "prefs.jsonl", 4)
    recipe = {"name": "t", "models": {"base": str(tiny_model_dir)},
              "data": {"preference_batches": [{"path": str(prefs), "round": 1}]},
              "run": {"launcher": TORCHRUN_2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def fake_worker(self, stage, spec, command):
        assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert spec["launch"] == {"launcher": TORCHRUN_2, "world_size": 2, "parallelism": "ddp"}
        shutil.copytree(tiny_model_dir, Path(spec["out_dir"]) / "model")  # stands in for the trained model
        return {"outputs": {"model": "round_01/rm/model"}, "metrics": {}}

    monkeypatch.setattr(Round, "_run_in_worker", fake_worker)
    run_dir = tmp_path / "run"
    Round(1, load_recipe(path), run_dir).run_stage("rm")
    rec = read_record(run_dir, 1, "rm")
    assert rec["launch"]["world_size"] == 2 and rec["inputs"]["launch"]["world_size"] == 2
    assert "[2x ddp]" in status_table(run_dir)
    assert Round(1, load_recipe(path), run_dir).run_stage("rm")["input_hash"] == rec["input_hash"]  # skipped
    recipe["run"]["launcher"] = ["torchrun", "--standalone", "--nproc_per_node", "4"]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(InputsChanged, match="launch"):
        Round(1, load_recipe(path), run_dir).run_stage("rm")


# ------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_2() -> list[str]:
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]


def _preferences(path: Path, n: int, seed: int = 0) -> Path:
    """Rankings whose responses differ in length, so the two ranks see different token counts."""
    rng = random.Random(seed)
    words = ["the", "sky", "is", "a", "of", "box", "red", "blue", "good"]

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"tell me {text(2 + i % 3)}"}],
             "chosen": [{"role": "assistant", "content": f"good {text(1 + 3 * (i % 4))} good"}],
             "rejected": [{"role": "assistant", "content": text(2 + (i % 3))}],
             "edited": [{"role": "assistant", "content": f"good good {text(2)}"}] if i % 2 else None,
             "strength": "significantly_better" if i % 3 else "better"} for i in range(n)]
    for r in rows:
        if r["edited"] is None:
            del r["edited"]
    write_jsonl(path, rows)
    return path


def _sft_rows(path: Path, n: int) -> Path:
    rng = random.Random(1)
    rows = [{"messages": [{"role": "user", "content": f"count to {i}"},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1 + rng.randrange(12)))}]}
            for i in range(n)]
    write_jsonl(path, rows)
    return path


def _run(tmp_path: Path, name: str, stage: str, cfg: dict, inputs: dict, launcher: list[str] | None,
         base: str, dump: bool = False, delay: float = 0.0) -> Path:
    """Run one stage through the (instrumented) stage worker under `launcher`; returns its out_dir."""
    plan = plan_launch(launcher, has_gpu=False)
    run_dir = tmp_path / name
    out = run_dir / "round_01" / stage
    out.mkdir(parents=True)
    spec = {"stage": stage, "round": 1, "run_dir": str(run_dir), "out_dir": str(out), "inputs": inputs,
            "extra": {}, "seed": 0, "recipe": {"name": "t", "models": {"base": base}, stage: cfg},
            "result": str(out / ".result.json"),
            "launch": {"launcher": plan.launcher, "world_size": plan.world_size, "parallelism": plan.parallelism}}
    spec_path = out / ".spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("POSTTRAIN_TEST_DUMP", None)
    if dump:
        env["POSTTRAIN_TEST_DUMP"] = str(tmp_path / f"{name}-dump")
    env["POSTTRAIN_TEST_SAVE_DELAY"] = str(delay)
    proc = subprocess.run([*plan.command, str(HELPER), str(spec_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert (out / ".result.json").exists()
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _assert_complete(folder: Path) -> None:
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).is_file(), f"{folder} lacks {f}: {sorted(p.name for p in folder.iterdir())}"
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".old")]
    assert not leftovers, leftovers


# ------------------------------------------------------------------------------ 2 processes (slow)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False])
def test_rm_on_two_processes_equals_one_and_ranks_agree(tmp_path, tiny_model_dir, packing):
    prefs = _preferences(tmp_path / "prefs.jsonl", 8)
    inputs = {"base_model": str(tiny_model_dir), "preference_files": [str(prefs)], "heldout_preference_files": []}
    # 8 rankings, global batch 4 (packed) / 8 pairs (pairs): 2 optimizer steps.
    batch = 4 if packing else 8
    cfg = {"packing": packing, "learning_rate": 2e-3, "epochs": 1, "heldout_fraction": 0, "save_steps": 1000,
           "logging_steps": 1, "keep_unlabelled": True, "keep_strengths": ["significantly_better", "better"]}
    one = _run(tmp_path, "one", "rm", {**cfg, "batch_size": batch}, inputs, None, str(tiny_model_dir))
    launcher = _accelerate_2() if packing else TORCHRUN_2
    two = _run(tmp_path, "two", "rm", {**cfg, "batch_size": batch // 2}, inputs, launcher, str(tiny_model_dir),
               dump=True)
    r0 = torch.load(tmp_path / "two-dump" / "rank0.pt")
    r1 = torch.load(tmp_path / "two-dump" / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks hold different weights after training"
    a, b = _weights(one / "model"), _weights(two / "model")
    base = _weights(Path(tiny_model_dir))
    moved = max((a[k] - base[k]).abs().max().item() for k in base if k in a)
    assert moved > 1e-3  # the steps did something
    # Adam's first steps move each weight by about the learning rate whatever the gradient's size,
    # so where a gradient is near zero, float noise from other padding shapes shows (measured
    # 6e-5 packed, of 3e-3 moved); a per-rank pair mean instead of the global one gave 6e-3.
    assert _max_diff(a, b) < 1e-4
    _assert_complete(two / "model")
    assert json.loads((two / ".result.json").read_text())["outputs"] == {"model": "round_01/rm/model"}


@pytest.mark.parametrize("rows, world", [(127, 2), (113, 2), (16, 2), (7, 3), (1, 2)])
def test_exact_shards_deal_each_global_batch_once_and_pad_with_zero_weight_rows(rows, world):
    from torch.utils.data import BatchSampler

    from posttrain.distributed import ExactShards, ZeroWeight

    b = 8 if rows > 16 else 2
    order = random.Random(rows).sample(range(rows), rows)
    single = [order[i:i + world * b] for i in range(0, rows, world * b)]  # one process, batch W * b
    ranks = [list(ExactShards(BatchSampler(order, b, drop_last=False), r, world)) for r in range(world)]
    assert all(len(steps) == len(single) == len(ExactShards(BatchSampler(order, b, False), r, world))
               for r, steps in enumerate(ranks))
    for k, batch in enumerate(single):
        parts = [ranks[r][k] for r in range(world)]
        real = [i for part in parts for i in part if not isinstance(i, ZeroWeight)]
        assert real == batch  # the union, in order, nothing repeated
        assert all(len(p) == 1 for p in parts if any(isinstance(i, ZeroWeight) for i in p))


# The default suite runs rm at 127 rows (the demo's count); the rest are slow (about 25 s each on
# 2 cores). The zero-weight step of 113 rows has a unit test (test_exact_shards_...) by default.
@pytest.mark.parametrize("rows", [127, pytest.param(113, marks=pytest.mark.slow)])
def test_packed_rm_on_two_processes_equals_one_when_the_data_does_not_divide(tmp_path, tiny_model_dir, rows):
    """127 rankings, global batch 16: the last step holds 15 (8 + 7 over the ranks); 113: it holds
    1, so rank 1 runs a zero-weight step. accelerate's padding of the last batch gave 5.6e-5."""
    prefs = _preferences(tmp_path / "prefs.jsonl", rows)
    inputs = {"base_model": str(tiny_model_dir), "preference_files": [str(prefs)], "heldout_preference_files": []}
    cfg = {"learning_rate": 2e-3, "epochs": 1, "heldout_fraction": 0, "save_steps": 1000, "logging_steps": 1,
           "keep_unlabelled": True, "keep_strengths": ["significantly_better", "better"]}
    one = _run(tmp_path, "one", "rm", {**cfg, "batch_size": 16}, inputs, None, str(tiny_model_dir))
    two = _run(tmp_path, "two", "rm", {**cfg, "batch_size": 8}, inputs, TORCHRUN_2, str(tiny_model_dir))
    steps = [json.loads((out / "variants" / "v0" / "metrics.json").read_text())["steps"] for out in (one, two)]
    assert steps == [-(-rows // 16)] * 2
    a, b = _weights(one / "model"), _weights(two / "model")
    base = _weights(Path(tiny_model_dir))
    assert max((a[k] - base[k]).abs().max().item() for k in base) > 1e-3  # the steps did something
    print(f"rm {rows} rankings: max weight difference {_max_diff(a, b):.2e}")
    assert _max_diff(a, b) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("rows,packing", [(127, True), (113, True), (127, False)])
def test_sft_on_two_processes_equals_one_when_the_data_does_not_divide(tmp_path, tiny_model_dir, rows, packing):
    """Packed (the default: each rank packs its own per-device batch) and padded rows alike."""
    data = _sft_rows(tmp_path / "sft.jsonl", rows)
    inputs = {"init_model": str(tiny_model_dir), "sft_files": [str(data)]}
    cfg = {"learning_rate": 1e-3, "epochs": 1, "save_steps": 1000, "logging_steps": 1, "max_length": 64,
           "packing": packing}
    one = _run(tmp_path, "one", "sft", {**cfg, "batch_size": 16}, inputs, None, str(tiny_model_dir))
    two = _run(tmp_path, "two", "sft", {**cfg, "batch_size": 8}, inputs, TORCHRUN_2, str(tiny_model_dir))
    a, b = _weights(one / "model"), _weights(two / "model")
    assert _max_diff(a, _weights(Path(tiny_model_dir))) > 1e-4
    print(f"sft {rows} examples: max weight difference {_max_diff(a, b):.2e}")
    assert _max_diff(a, b) < 1e-5


@pytest.mark.slow
def test_sft_on_two_processes_equals_one(tmp_path, tiny_model_dir):
    data = _sft_rows(tmp_path / "sft.jsonl", 8)
    inputs = {"init_model": str(tiny_model_dir), "sft_files": [str(data)]}
    cfg = {"learning_rate": 1e-3, "epochs": 1, "save_steps": 1000, "logging_steps": 1, "max_length": 128}
    one = _run(tmp_path, "one", "sft", {**cfg, "batch_size": 4}, inputs, None, str(tiny_model_dir))
    two = _run(tmp_path, "two", "sft", {**cfg, "batch_size": 2}, inputs, TORCHRUN_2, str(tiny_model_dir))
    a, b = _weights(one / "model"), _weights(two / "model")
    assert _max_diff(a, _weights(Path(tiny_model_dir))) > 1e-4
    assert _max_diff(a, b) < 1e-5
    _assert_complete(two / "model")


@pytest.mark.slow
@pytest.mark.parametrize("rows", [127, 113])
def test_dpo_with_nll_on_two_processes_equals_one_when_the_data_does_not_divide(tmp_path, tiny_model_dir, rows):
    prefs = _preferences(tmp_path / "prefs.jsonl", rows)
    inputs = {"sft_model": str(tiny_model_dir), "preference_files": [str(prefs)], "samples": None}
    cfg = {"learning_rate": 1e-3, "epochs": 1, "save_steps": 1000, "logging_steps": 1, "max_length": 64,
           "nll_coef": 0.2}
    one = _run(tmp_path, "one", "dpo", {**cfg, "batch_size": 16}, inputs, None, str(tiny_model_dir))
    two = _run(tmp_path, "two", "dpo", {**cfg, "batch_size": 8}, inputs, TORCHRUN_2, str(tiny_model_dir))
    a, b = _weights(one / "variants" / "v0" / "model"), _weights(two / "variants" / "v0" / "model")
    assert _max_diff(a, _weights(Path(tiny_model_dir))) > 1e-4
    print(f"dpo {rows} pairs: max weight difference {_max_diff(a, b):.2e}")
    assert _max_diff(a, b) < 1e-5


@pytest.mark.slow
def test_dpo_with_nll_on_two_processes_equals_one_and_rank0_alone_publishes(tmp_path, tiny_model_dir):
    prefs = _preferences(tmp_path / "prefs.jsonl", 8)
    inputs = {"sft_model": str(tiny_model_dir), "preference_files": [str(prefs)], "samples": None}
    cfg = {"learning_rate": 1e-3, "epochs": 1, "save_steps": 1000, "logging_steps": 1, "max_length": 128,
           "nll_coef": 0.2}
    one = _run(tmp_path, "one", "dpo", {**cfg, "batch_size": 4}, inputs, None, str(tiny_model_dir))
    # Rank 0 sleeps 3 s between writing v0 and publishing it: rank 1 must wait, not move on.
    two = _run(tmp_path, "two", "dpo", {**cfg, "batch_size": 2}, inputs, TORCHRUN_2, str(tiny_model_dir),
               dump=True, delay=3.0)
    a, b = _weights(one / "variants" / "v0" / "model"), _weights(two / "variants" / "v0" / "model")
    assert _max_diff(a, _weights(Path(tiny_model_dir))) > 1e-4
    assert _max_diff(a, b) < 1e-4  # 2e-6 measured; 3e-3 with a per-rank NLL token mean
    _assert_complete(two / "variants" / "v0" / "model")
    assert (two / "variants" / "v0" / "metrics.json").is_file()

    def ref_rows(out):
        (cache,) = (out / "work" / "ref_cache").glob("ref_logps-*.json")
        return json.loads(cache.read_text())["rows"]

    ra, rb = ref_rows(one), ref_rows(two)
    assert ra.keys() == rb.keys() and len(ra) == 8
    assert max(abs(x - y) for k in ra for x, y in zip(ra[k], rb[k])) < 1e-5

    dump = tmp_path / "two-dump"
    published = [json.loads(line) for line in (dump / "times0.jsonl").read_text().splitlines()]
    published = [e["t"] for e in published if e["event"] == "published" and e["out"].endswith("/v0/model")]
    returned = [json.loads(line) for line in (dump / "times1.jsonl").read_text().splitlines()]
    returned = [e["t"] for e in returned if e["event"] == "returned" and e["out"].endswith("/v0/model")]
    assert len(published) == 1 and len(returned) == 1
    assert returned[0] >= published[0], "rank 1 went on before rank 0 had published the model"


@pytest.mark.slow
def test_fsdp2_packed_rm_full_state_dict_and_lora_merge_on_gloo(tmp_path, tiny_model_dir):
    """FSDP2 driven directly (accelerate runs no FSDP without GPUs): see tests/fsdp2_worker.py."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    plan = plan_launch(TORCHRUN_2, has_gpu=False)
    proc = subprocess.run([*plan.command, str(HELPER.with_name("fsdp2_worker.py")), str(tiny_model_dir), str(out)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((out / "result.json").read_text())
    for name, got in result.items():
        assert "error" not in got, f"{name}: {got['error']}\n{got['traceback']}"
    rm_ = result["packed_rm"]
    assert rm_["sharded"] and rm_["score_diff"] < 1e-6 and rm_["loss_diff"] < 1e-6 and rm_["grad_diff"] < 1e-6
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    saved = load_file(str(out / "rm_model" / "model.safetensors"))
    assert set(saved) == set(base) | {"score.weight"}
    assert all(saved[k].shape == base[k].shape for k in base)
    assert result["lora"] == {"keys_equal": True, "weight_diff": 0.0}
    merged = load_file(str(out / "lora_merged" / "model.safetensors"))
    assert set(merged) == set(base) and all(merged[k].shape == base[k].shape for k in base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapters were merged in
    _assert_complete(out / "lora_merged")


def test_plain_copy_takes_a_tied_tensor_once_and_refuses_a_missing_one(tiny_tokenizer):
    from posttrain.gather import plain_copy
    from posttrain.world.tiny import make_tiny_model

    model = make_tiny_model(tiny_tokenizer, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state and model.config.tie_word_embeddings
    del state["lm_head.weight"]  # DeepSpeed's gather lists a tied tensor once
    copy = plain_copy(model, state)
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in model.state_dict().items())
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        plain_copy(model, state)
