"""posttrain.averaging (streaming weight averaging) against in-memory hand computations, and the
average stage (posttrain.stages.average) around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from posttrain.averaging import (
    INDEX_FILE,
    AverageError,
    accumulate,
    average_checkpoints,
    normalise_weights,
    plan_shards,
)
from posttrain.stages.average import AverageConfig, run
from posttrain.stage import StageContext, headline
from posttrain.training import Variant

# --------------------------------------------------------------------------------------
# helpers


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder, sharded or not."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = json.loads((folder / INDEX_FILE).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    return out


def in_memory_average(folders, weights) -> dict[str, torch.Tensor]:
    """The reference: sum_i w_i * t_i.float() with w normalised, cast back to the dtype."""
    total = sum(weights)
    ws = [w / total for w in weights]
    states = [read_weights(f) for f in folders]
    out = {}
    for name, t0 in states[0].items():
        avg = sum(w * s[name].float() for w, s in zip(ws, states))
        out[name] = avg.to(t0.dtype)
    return out


def no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """Three tiny Llamas with different random weights (fp32, tied embeddings)."""
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("avg_models")
    return [save_checkpoint(make_tiny_model(tiny_tokenizer, seed=s), tiny_tokenizer, root / f"m{s}") for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory, tiny_tokenizer, models):
    from transformers import AutoModelForCausalLM

    from posttrain.modeling import save_checkpoint

    root = tmp_path_factory.mktemp("avg_bf16")
    out = []
    for i, m in enumerate(models):
        model = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.bfloat16)
        out.append(save_checkpoint(model, tiny_tokenizer, root / f"b{i}"))
    return out


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory, tiny_tokenizer, models):
    """The same three models saved in ~300 KB shards with an index."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("avg_sharded")
    out = []
    for i, m in enumerate(models):
        model = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32)
        model.save_pretrained(str(root / f"s{i}"), max_shard_size="300KB")
        tiny_tokenizer.save_pretrained(str(root / f"s{i}"))
        assert (root / f"s{i}" / INDEX_FILE).is_file()
        out.append(root / f"s{i}")
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# --------------------------------------------------------------------------------------
# the pure functions


def test_normalise_weights_by_hand():
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([1, 3], 2) == [0.25, 0.75]
    assert normalise_weights([2, 0, 2], 3) == [0.5, 0.0, 0.5]
    with pytest.raises(AverageError, match="got 2 weights for 3 input checkpoints"):
        normalise_weights([1, 1], 3)
    with pytest.raises(AverageError, match="sum to 0.0; they must sum to a positive number"):
        normalise_weights([0, 0], 2)
    with pytest.raises(AverageError, match="weight 1 is -1.0"):
        normalise_weights([2, -1], 2)
    with pytest.raises(AverageError, match="weight 0 is nan"):
        normalise_weights([float("nan"), 1], 2)


def test_accumulate_matches_hand_sum():
    a = torch.tensor([1.0, 2.0, -4.0])
    b = torch.tensor([3.0, 0.0, 8.0])
    acc = accumulate(None, a.clone(), 0.25)
    acc = accumulate(acc, b.clone(), 0.75)
    assert torch.equal(acc, torch.tensor([2.5, 0.5, 5.0]))  # 0.25*a + 0.75*b by hand
    # bf16 inputs are summed in fp32, not in bf16
    acc = accumulate(None, torch.tensor([1.0], dtype=torch.bfloat16), 0.5)
    assert acc.dtype == torch.float32


def test_plan_shards_by_hand():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)]
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(sizes, 100) == [["a", "b", "c", "d", "e"]]


def test_config_says_where_weights_went_and_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"moved: give each DPO variant its `weight`"):
        AverageConfig(weights=[1, 2])
    with pytest.raises(ValueError, match="extra"):
        AverageConfig(weigths=[1])
    with pytest.raises(ValueError, match="greater than 0"):
        Variant(weight=0)


# --------------------------------------------------------------------------------------
# averaging results


def test_fp32_average_is_exact_and_weighted(models, tmp_path):
    before = [(m / "model.safetensors").read_bytes() for m in models]
    out = average_checkpoints(models, tmp_path / "avg", [1.0, 2.0, 1.0])
    # the accumulation scales tensors in place: the inputs on disk must be untouched
    assert [(m / "model.safetensors").read_bytes() for m in models] == before
    got, want = read_weights(out), in_memory_average(models, [1.0, 2.0, 1.0])
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want[name]), name
    # the weights matter: a uniform average is a different model
    uniform = in_memory_average(models, [1, 1, 1])
    assert not torch.equal(got["model.embed_tokens.weight"], uniform["model.embed_tokens.weight"])
    # side files come from the first input
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (models[0] / name).read_bytes()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_one_hot_weights_reproduce_that_input(models, tmp_path):
    out = average_checkpoints(models, tmp_path / "avg", [0, 5, 0])
    got, m1 = read_weights(out), read_weights(models[1])
    assert all(torch.equal(got[n], m1[n]) for n in m1)


def test_bf16_average_within_dtype_precision(bf16_models, models, tmp_path):
    out = average_checkpoints(bf16_models, tmp_path / "avg", [3, 1, 1])
    got = read_weights(out)
    want = in_memory_average(bf16_models, [3, 1, 1])  # fp32 sum of the bf16 tensors, cast once
    fp32_truth = in_memory_average(models, [3, 1, 1])
    fp32_inputs = [read_weights(m) for m in models]
    ws = [0.6, 0.2, 0.2]
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, want[name]), name
        # and within bf16 rounding of the fp32 soup: each input was rounded once (unit
        # roundoff 2^-8: bf16 keeps 8 significant bits) and so was the output:
        # |got - truth| <= 2^-8 * (sum_i w_i |t_i| + |truth|)
        scale = sum(w * s[name].abs() for w, s in zip(ws, fp32_inputs)) + fp32_truth[name].abs()
        assert bool(((t.float() - fp32_truth[name]).abs() <= 2 ** -8 * scale * (1 + 1e-3)).all()), name


def test_sharded_inputs_and_outputs(sharded_models, models, tmp_path):
    plain = read_weights(average_checkpoints(models, tmp_path / "plain"))
    out = average_checkpoints(sharded_models, tmp_path / "sharded", max_shard_size=200_000)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:  # each shard under the limit unless it holds one large tensor
        n = len([k for k, v in index["weight_map"].items() if v == shard])
        assert (out / shard).stat().st_size <= 200_000 + 1024 or n == 1
    got = read_weights(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert set(got) == set(plain) and all(torch.equal(got[n], plain[n]) for n in plain)


def test_tied_embeddings_stay_tied_and_output_generates(models, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    # an input saved by another tool that also stores the tied copy is accepted
    dup = copy_model(models[2], tmp_path / "dup")
    rewrite_weights(dup, lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"].clone()))
    out = average_checkpoints([models[0], models[1], dup], tmp_path / "avg")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    want = in_memory_average(models, [1, 1, 1])["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight.detach(), want)
    ids = tiny_tokenizer("hello", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert gen.shape == (1, ids.shape[1] + 5)


def test_untied_head_is_averaged_not_dropped(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import make_tiny_model

    ins = [save_checkpoint(make_tiny_model(tiny_tokenizer, seed=s, tie_word_embeddings=False), tiny_tokenizer,
                           tmp_path / f"u{s}") for s in (4, 5)]
    out = average_checkpoints(ins, tmp_path / "avg", [1, 3])
    got, want = read_weights(out), in_memory_average(ins, [1, 3])
    assert "lm_head.weight" in got and torch.equal(got["lm_head.weight"], want["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight.detach(), want["lm_head.weight"])


def test_non_float_tensors_copied_when_identical(models, tmp_path):
    a, b = copy_model(models[0], tmp_path / "a"), copy_model(models[1], tmp_path / "b")
    for m in (a, b):
        rewrite_weights(m, lambda s: s.__setitem__("model.step", torch.tensor([7, 8], dtype=torch.int64)))
    got = read_weights(average_checkpoints([a, b], tmp_path / "avg"))
    assert got["model.step"].dtype == torch.int64 and got["model.step"].tolist() == [7, 8]


def test_lora_input_is_merged_before_averaging(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = models[0]
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter changes the weights
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "lora"))
    merged = peft_model.merge_and_unload().state_dict()
    adapter_cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base)

    out = average_checkpoints([tmp_path / "lora", models[1]], tmp_path / "avg")
    got, other = read_weights(out), read_weights(models[1])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], read_weights(base)[q])
    for name in (q, "model.layers.1.self_attn.v_proj.weight", "model.norm.weight"):
        assert torch.equal(got[name], 0.5 * merged[name] + 0.5 * other[name]), name
    assert not [p for p in tmp_path.iterdir() if ".lora." in p.name]  # the merged copy is gone


# --------------------------------------------------------------------------------------
# errors: each before anything is written


def _expect_error(inputs, tmp_path, match, weights=None):
    with pytest.raises(AverageError, match=match):
        average_checkpoints(inputs, tmp_path / "avg", weights)
    assert no_leftovers(tmp_path, "avg")


def test_error_weight_count_and_sum(models, tmp_path):
    _expect_error(models, tmp_path, "got 2 weights for 3 input checkpoints", [1, 1])
    _expect_error(models, tmp_path, "must sum to a positive number", [0, 0, 0])


def test_error_differing_tensor_names(models, tmp_path):
    b = copy_model(models[1], tmp_path / "b")
    rewrite_weights(b, lambda s: s.pop("model.norm.weight"))
    _expect_error([models[0], b], tmp_path, r"tensor names differ: tensor model\.norm\.weight is in .*m1 but not in .*b")


def test_error_differing_shapes(models, tmp_path):
    b = copy_model(models[1], tmp_path / "b")
    rewrite_weights(b, lambda s: s.__setitem__("model.norm.weight", torch.ones(64)))
    _expect_error([models[0], b], tmp_path, r"tensor shapes differ: model\.norm\.weight is \[128\] in .* but \[64\] in .*b")


def test_error_differing_architecture_and_vocab(models, tmp_path):
    b = copy_model(models[1], tmp_path / "b")
    edit_config(b, architectures=["MistralForCausalLM"])
    _expect_error([models[0], b], tmp_path, r"architectures differ: .*has architectures=\['LlamaForCausalLM'\]")
    c = copy_model(models[1], tmp_path / "c")
    edit_config(c, vocab_size=999)
    _expect_error([models[0], c], tmp_path, r"vocabularies differ: .* has vocab_size=\d+, .*c/config.json has vocab_size=999")


def test_error_differing_tokenizer_or_generation_config(models, tmp_path):
    from posttrain.world.tiny import build_tokenizer

    b = copy_model(models[1], tmp_path / "b")
    build_tokenizer(["a completely different corpus, 42 42 42"]).save_pretrained(str(b))
    _expect_error([models[0], b], tmp_path, r"tokenizers differ: .*tokenizer.json")
    c = copy_model(models[1], tmp_path / "c")
    gen = json.loads((c / "generation_config.json").read_text())
    (c / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 3}))
    _expect_error([models[0], c], tmp_path, r"generation configs differ: .*c/generation_config.json")


def test_error_missing_and_corrupt_shard(sharded_models, tmp_path):
    b = copy_model(sharded_models[1], tmp_path / "b")
    shard = sorted(b.glob("model-*.safetensors"))[1]
    shard.unlink()
    _expect_error([sharded_models[0], b], tmp_path, f"missing shard .*{shard.name}")
    c = copy_model(sharded_models[1], tmp_path / "c")
    shard = sorted(c.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    _expect_error([sharded_models[0], c], tmp_path, f"corrupt shard .*{shard.name}")


def test_error_non_float_tensors_differ(models, tmp_path):
    a, b = copy_model(models[0], tmp_path / "a"), copy_model(models[1], tmp_path / "b")
    rewrite_weights(a, lambda s: s.__setitem__("model.step", torch.tensor([1])))
    rewrite_weights(b, lambda s: s.__setitem__("model.step", torch.tensor([2])))
    _expect_error([a, b], tmp_path, r"non-float tensor model\.step \(I64\) differs between .*a/model.safetensors")


def test_error_pickled_weights_and_argument_order(models, tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy2(models[1] / "config.json", b / "config.json")
    (b / "pytorch_model.bin").write_bytes(b"x")
    _expect_error([models[0], b], tmp_path, "holds only pickled weights")
    with pytest.raises(TypeError, match="`inputs` is a list"):
        average_checkpoints(tmp_path / "avg", list(models))


def test_existing_output_is_kept_when_averaging_fails(models, tmp_path):
    out = average_checkpoints(models[:2], tmp_path / "avg")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(AverageError):
        average_checkpoints(models, out, [1, 1])
    assert (out / "model.safetensors").read_bytes() == before


# --------------------------------------------------------------------------------------
# the stage


def _ctx(tmp_path, models, config=None, weights=None):
    out = tmp_path / "round_01" / "average"
    return StageContext(stage="average", round=1, run_dir=tmp_path, out_dir=out,
                        config=config or AverageConfig(), inputs={"models": list(models), "weights": weights})


def test_stage_one_input_is_passed_through(tmp_path, models):
    m = copy_model(models[0], tmp_path / "round_01" / "dpo" / "v0")
    res = run(_ctx(tmp_path, [m]))
    assert res.outputs == {"model": "round_01/dpo/v0"}
    assert not (tmp_path / "round_01" / "average" / "model").exists()
    assert res.metrics["n_inputs"] == 1


def test_stage_averages_variants(tmp_path, models):
    res = run(_ctx(tmp_path, models[:2], AverageConfig(max_shard_size=10**9), weights=[3, 1]))
    assert res.outputs == {"model": "round_01/average/model"}
    assert headline("average", res.metrics) == [("models", 2)]  # what status shows
    got = read_weights(tmp_path / res.outputs["model"])
    want = in_memory_average(models[:2], [3, 1])
    assert all(torch.equal(got[n], want[n]) for n in want)
    m = res.metrics
    assert m["n_inputs"] == 2 and m["weights"] == [0.75, 0.25] and m["tensors"] == len(want)
    assert m["bytes"] == sum(t.numel() * 4 for t in want.values()) and m["seconds"] >= 0
