"""Sharded trainer checkpoints and the streamed final save under FSDP2 (posttrain.training,
posttrain.gather). The 2-rank gloo test drives FSDP2 directly (tests/fsdp2_checkpoint_worker.py);
the fast ones check the streamed save in one process against save_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

WORKER = Path(__file__).with_name("fsdp2_checkpoint_worker.py")


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_model(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _logits(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8, 9]])).logits


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_resume_and_streamed_final_save_on_gloo(tmp_path, tiny_model_dir):
    from posttrain.modeling import verify_model_folder

    out = tmp_path / "out"
    out.mkdir()
    for phase in ("straight", "first", "resume"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(WORKER), phase, str(tiny_model_dir), str(out)],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
        failed = sorted(out.glob(f"{phase}.rank*.json"))
        detail = "\n".join(json.loads(f.read_text()).get("traceback", "") for f in failed)
        assert proc.returncode == 0, f"{phase}: {detail}\n{proc.stderr[-3000:]}"
    straight = json.loads((out / "straight.json").read_text())
    first = json.loads((out / "first.json").read_text())
    resume = json.loads((out / "resume.json").read_text())

    # (a) the checkpoint: the old config's FULL plugin made sharded; each rank wrote its own shards;
    # neither saving nor resuming gathered a full tensor; the unmarked checkpoint was passed over.
    assert first["plugin_changed"] and "SHARDED_STATE_DICT" in first["plugin_state_dict_type"]
    for kind in ("full", "lora"):
        ckpt = out / "work" / kind / "checkpoint-2"
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            shards = sorted(p.name for p in (ckpt / part).glob("*.distcp"))
            assert shards == ["__0_0.distcp", "__1_0.distcp"], (kind, part, shards)
        assert (ckpt / "COMPLETE").is_file() and not (out / "work" / kind / "checkpoint-3" / "COMPLETE").exists()
        # Rank 1 wrote its RNG state a second late: the marker waited for it.
        assert (ckpt / "COMPLETE").stat().st_mtime >= (ckpt / "rng_state_1.pth").stat().st_mtime
        assert all(m["calls"] == 0 for m in first[f"{kind}_save_meter"] + resume[f"{kind}_load_meter"])
        assert resume[f"{kind}_resumed_from"] == "checkpoint-2"
    # Killed after step 3's save began, resumed from step 2: the weights of the uninterrupted run.
    _assert_same_model(out / "resumed", out / "straight")
    _assert_same_model(out / "lora_resumed", out / "lora_trained")
    assert not torch.equal(_tensors(out / "lora_trained")["model.layers.0.self_attn.q_proj.weight"],
                           _tensors(tiny_model_dir)["model.layers.0.self_attn.q_proj.weight"])  # the adapters trained
    only_model = _tensors(out / "resumed_model_only")
    assert any(not torch.equal(v, _tensors(out / "straight")[k]) for k, v in only_model.items()), \
        "a resume without the optimizer state matched too: the comparison proves nothing"

    # (b) the streamed save equals the full gather's save_pretrained, in one file or in several with an index.
    for name in ("straight", "straight_shards", "resumed", "lora_resumed", "lora_streamed", "rm_streamed"):
        verify_model_folder(out / name)
    _assert_same_model(out / "straight", out / "gathered")
    _assert_same_model(out / "straight_shards", out / "gathered")
    index = json.loads((out / "straight_shards" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(_tensors(out / "gathered"))
    assert torch.equal(_logits(out / "straight_shards"), _logits(out / "gathered"))
    _assert_same_model(out / "lora_streamed", out / "lora_reference")  # merged as peft merges
    _assert_same_model(out / "rm_streamed", out / "rm_reference")  # `prepare`'s pad id in the config
    # No rank held more than the largest tensor in full at any time; the gather held the whole model.
    largest = straight["largest_tensor_bytes"]
    for meter in straight["stream_meter"] + straight["lora_meter"]:
        assert 0 < meter["peak_bytes"] <= largest, meter
    assert straight["stream_meter"][0]["calls"] == len(_tensors(out / "straight"))
    assert straight["gather_held_bytes"][0] >= straight["model_bytes"] > 5 * largest


# ------------------------------------------------------------------------------ one process (fast)


def test_streamed_save_of_a_plain_model_equals_save_pretrained(tmp_path, tiny_tokenizer):
    from posttrain.gather import stream_save
    from posttrain.modeling import save_checkpoint, verify_model_folder
    from posttrain.world.tiny import make_tiny_model

    model = make_tiny_model(tiny_tokenizer, seed=4)
    save_checkpoint(model, tiny_tokenizer, tmp_path / "reference")
    stream_save(model, tiny_tokenizer, tmp_path / "one")
    stream_save(model, tiny_tokenizer, tmp_path / "many", max_shard_size=100_000)
    for name in ("one", "many"):
        verify_model_folder(tmp_path / name)
        _assert_same_model(tmp_path / name, tmp_path / "reference")
    assert "lm_head.weight" not in _tensors(tmp_path / "one")  # tied: kept once, as save_pretrained keeps it
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(tmp_path / "many"), _logits(tmp_path / "reference"))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


def test_streamed_save_merges_lora_as_peft_does(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from posttrain.gather import stream_save
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import make_tiny_model

    def build():
        torch.manual_seed(7)  # lora_A's init
        peft = get_peft_model(make_tiny_model(tiny_tokenizer, seed=5),
                              LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"],
                                         lora_dropout=0.0))
        torch.manual_seed(6)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        return peft

    peft = build()
    stream_save(peft, tiny_tokenizer, tmp_path / "streamed")
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    save_checkpoint(build().merge_and_unload(), tiny_tokenizer, tmp_path / "reference")
    _assert_same_model(tmp_path / "streamed", tmp_path / "reference")
    assert all(torch.equal(before[k], v) for k, v in peft.state_dict().items())  # the model itself untouched
    base = _tensors(tmp_path / "reference")
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"],
                           make_tiny_model(tiny_tokenizer, seed=5).state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_what_cannot_be_streamed_is_gathered_instead(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    from posttrain.gather import stream_sources
    from posttrain.world.tiny import make_tiny_model

    assert stream_sources(make_tiny_model(tiny_tokenizer)) is not None
    # v5 fuses Mixtral's experts on load and splits them on save: several tensors at once.
    moe = MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                           vocab_size=64))
    assert stream_sources(moe) is None
    dora = get_peft_model(make_tiny_model(tiny_tokenizer), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert stream_sources(dora) is None


def test_a_full_state_dict_fsdp2_plugin_is_made_sharded_and_others_are_left_alone():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardedStateDictConfig

    from posttrain.training import sharded_fsdp_checkpoints

    full = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    assert full.state_dict_config.rank0_only  # what torch refuses with a sharded save
    assert sharded_fsdp_checkpoints(full)
    assert "SHARDED_STATE_DICT" in str(full.state_dict_type)
    assert isinstance(full.state_dict_config, ShardedStateDictConfig)
    assert not sharded_fsdp_checkpoints(full)  # already sharded
    v1 = FullyShardedDataParallelPlugin(fsdp_version=1, state_dict_type="FULL_STATE_DICT")
    assert not sharded_fsdp_checkpoints(v1) and "FULL_STATE_DICT" in str(v1.state_dict_type)
    assert not sharded_fsdp_checkpoints(None)


def test_the_shipped_fsdp2_config_checkpoints_sharded():
    import yaml

    config = yaml.safe_load((Path(__file__).parent.parent / "configs" / "accelerate" / "fsdp2.yaml").read_text())
    assert config["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_the_marker_callback_is_among_the_stage_callbacks_after_the_sharding_one(tmp_path):
    from posttrain.training import COMPLETE_MARKER, last_complete_checkpoint, stage_callbacks

    names = [type(c).__name__ for c in stage_callbacks()]
    assert names.index("_ShardedCheckpoints") < names.index("_MarkComplete")
    marker = next(c for c in stage_callbacks() if type(c).__name__ == "_MarkComplete")
    (tmp_path / "checkpoint-3").mkdir()
    marker.on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3, is_world_process_zero=True),
                   None)
    assert (tmp_path / "checkpoint-3" / COMPLETE_MARKER).is_file()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")


def test_streamed_save_of_a_lora_reward_model_takes_the_trained_score_head(tmp_path, tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from posttrain.gather import stream_save
    from posttrain.modeling import save_checkpoint
    from posttrain.stages import rm

    def build():
        torch.manual_seed(8)
        peft = get_peft_model(rm.load_reward_model(tiny_model_dir),
                              LoraConfig(r=2, target_modules=["k_proj"], task_type="SEQ_CLS", lora_dropout=0.0))
        for n, p in peft.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:  # what training would have changed
                torch.nn.init.normal_(p, std=0.05)
        return peft

    stream_save(build(), tiny_tokenizer, tmp_path / "streamed")
    save_checkpoint(build().merge_and_unload(), tiny_tokenizer, tmp_path / "reference")
    _assert_same_model(tmp_path / "streamed", tmp_path / "reference")
    head = _tensors(tmp_path / "streamed")["score.weight"]
    assert not torch.equal(head, build().base_model.model.score.original_module.weight.detach())
