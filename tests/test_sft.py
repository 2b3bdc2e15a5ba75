"""The sft stage: labels mask exactly the prompt; TRL keeps our labels; variants, LoRA, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from posttrain import throughput
from posttrain.stages import sft
from posttrain.data import SFTExample
from posttrain.stage import StageContext, headline, variant_mean
from posttrain.training import Variant

MULTI_TURN = [
    {"role": "system", "content": "answer briefly"},
    {"role": "user", "content": "sort 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
    {"role": "user", "content": "reverse 1 2"},
    {"role": "assistant", "content": "2 1"},
]


def _segments(labels):
    """Runs of consecutive target positions as (start, end) half-open ranges."""
    segs, start = [], None
    for i, t in enumerate(labels + [-100]):
        if t != -100 and start is None:
            start = i
        elif t == -100 and start is not None:
            segs.append((start, i))
            start = None
    return segs


def test_labels_mask_exactly_the_prompt_on_a_multi_turn_example(tiny_tokenizer):
    tok = tiny_tokenizer
    rows, counts = sft.encode_sft_examples(tok, [SFTExample("a", MULTI_TURN)], max_length=512)
    assert dict(counts) == {"kept": 1}
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    assert len(ids) == len(labels)
    # By hand: the whole sequence is the template's rendering ...
    assert tok.decode(ids) == tok.apply_chat_template(MULTI_TURN, tokenize=False)
    # ... and exactly two target runs, each an assistant answer plus its <|eot_id|>
    segs = _segments(labels)
    assert [tok.decode(ids[s:e]) for s, e in segs] == ["1 2 3<|eot_id|>", "2 1<|eot_id|>"]
    # everything before each run is the conversation so far with the generation prompt
    for (s, _), upto in zip(segs, (2, 4)):
        assert tok.decode(ids[:s]) == tok.apply_chat_template(MULTI_TURN[:upto], tokenize=False,
                                                              add_generation_prompt=True)
    # targets are the token ids themselves; the rest (headers, system, user turns) is -100
    assert all(lab == i for lab, i in zip(labels, ids) if lab != -100)
    masked = [i for i, lab in zip(ids, labels) if lab == -100]
    assert tok.convert_tokens_to_ids("<|start_header_id|>") in masked
    assert sum(1 for lab in labels if lab != -100) == sum(e - s for s, e in segs)


def _expected_last_turn(tok, messages):
    """By hand: the ids of the template's rendering up to the last turn's end-of-turn token, and
    the labels that make only that turn (its content and <|eot_id|>) a target."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt + messages[-1]["content"] + "<|eot_id|>", add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    return ids, [-100] * n_prompt + ids[n_prompt:]


def test_last_turn_makes_only_the_final_assistant_turn_a_target(tiny_tokenizer):
    tok = tiny_tokenizer
    rows, counts = sft.encode_sft_examples(tok, [SFTExample("a", MULTI_TURN)], max_length=512,
                                           targets="last_turn")
    assert dict(counts) == {"kept": 1}
    ids, labels = _expected_last_turn(tok, MULTI_TURN)
    assert rows[0]["input_ids"] == ids
    assert rows[0]["labels"] == labels
    # the earlier assistant turn "1 2 3" is context: no target there
    assert [tok.decode(ids[s:e]) for s, e in _segments(labels)] == ["2 1<|eot_id|>"]


def test_top1_rows_train_on_the_sampled_turn_and_recipe_data_on_what_targets_says(tiny_tokenizer):
    """A top-1 row's earlier assistant turns came with the prompt: never targets. The recipe's
    SFT data: every assistant turn by default (all_turns), the last with last_turn."""
    tok = tiny_tokenizer
    top1, data = [SFTExample("t", MULTI_TURN)], [SFTExample("d", MULTI_TURN)]
    rows, counts = sft.training_rows(tok, top1, data, sft.SFTStageConfig())
    assert sft.SFTStageConfig().targets == "all_turns"
    assert counts["kept"] == 2
    assert rows[0]["labels"] == _expected_last_turn(tok, MULTI_TURN)[1]
    assert [tok.decode(rows[1]["input_ids"][s:e]) for s, e in _segments(rows[1]["labels"])] == [
        "1 2 3<|eot_id|>", "2 1<|eot_id|>"]
    rows, _ = sft.training_rows(tok, top1, data, sft.SFTStageConfig(targets="last_turn"))
    assert rows[0]["labels"] == rows[1]["labels"] == _expected_last_turn(tok, MULTI_TURN)[1]


def test_prompt_too_long_is_dropped_and_counted(tiny_tokenizer):
    long = [{"role": "user", "content": "1 2 3 4 5 6 7 8 9 " * 20}, {"role": "assistant", "content": "ok"}]
    rows, counts = sft.encode_sft_examples(tiny_tokenizer, [SFTExample("a", long), SFTExample("b", MULTI_TURN)],
                                           max_length=40)
    assert counts["dropped_prompt_too_long"] == 1 and counts["kept"] == 1 and counts["truncated"] == 1
    assert len(rows[0]["input_ids"]) == 40


def test_trl_keeps_our_labels_and_the_loss_is_token_mean_cross_entropy(tiny_tokenizer, tiny_model_dir, tmp_path):
    from posttrain.modeling import load_causal_lm

    examples = [SFTExample("a", MULTI_TURN), SFTExample("b", MULTI_TURN[1:3])]
    rows, _ = sft.encode_sft_examples(tiny_tokenizer, examples, max_length=512)
    cfg = sft.SFTStageConfig(batch_size=2)
    trainer = sft.build_trainer(cfg=cfg, variant=Variant(), seed=0, init_model=Path(tiny_model_dir),
                                tokenizer=tiny_tokenizer, rows=rows, work_dir=tmp_path / "w")
    assert trainer.train_dataset["labels"] == [r["labels"] for r in rows]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    loss = trainer.compute_loss(trainer.model, batch).item()

    hand = load_causal_lm(tiny_model_dir).eval()
    num, den = 0.0, 0
    for r in rows:
        with torch.no_grad():
            logits = hand(input_ids=torch.tensor([r["input_ids"]])).logits[0]
        lab = torch.tensor(r["labels"][1:])
        keep = lab != -100
        num += F.cross_entropy(logits[:-1][keep], lab[keep], reduction="sum").item()
        den += int(keep.sum())
    assert loss == pytest.approx(num / den, rel=1e-4)


# ---------------------------------------------------------------------------------------- stage


def _ctx(tmp_path, model_dir, **cfg):
    data = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"sort {i} {i + 3} 1"},
                          {"role": "assistant", "content": f"1 {i} {i + 3}"}]} for i in range(2, 10)]
    rows.append({"messages": MULTI_TURN})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(batch_size=3, learning_rate=1e-3, epochs=2, save_steps=2, logging_steps=1, max_length=128)
    settings.update(cfg)
    run_dir = tmp_path / "run"
    return StageContext(stage="sft", round=1, run_dir=run_dir, out_dir=run_dir / "round_01" / "sft",
                        config=sft.SFTStageConfig(**settings),
                        inputs={"init_model": str(model_dir), "sft_files": [str(data)]})


@pytest.mark.slow
def test_two_variants_are_averaged(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    ctx = _ctx(tmp_path, tiny_model_dir, variants=[{}, {"seed": 7, "learning_rate": 3e-3}])
    res = sft.run(ctx)
    assert res.outputs == {"model": "round_01/sft/model"}
    assert res.metrics["examples"] == {"kept": 9}
    assert headline("sft", res.metrics) == [("loss", pytest.approx(variant_mean(res.metrics, "loss", "last"))),
                                            ("examples", 9), *throughput.headline(res.metrics)]  # what status shows
    assert [k for k, _ in throughput.headline(res.metrics)] == ["tok/s", "mfu"]
    v0 = load_file(ctx.out_dir / "variants" / "v0" / "model" / "model.safetensors")
    v1 = load_file(ctx.out_dir / "variants" / "v1" / "model" / "model.safetensors")
    avg = load_file(ctx.run_dir / res.outputs["model"] / "model.safetensors")
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    for k in base:
        assert torch.allclose(avg[k], (v0[k] + v1[k]) / 2, atol=1e-6), k
    assert any(not torch.equal(v0[k], base[k]) for k in base)
    assert (ctx.run_dir / res.outputs["model"] / "tokenizer_config.json").exists()
    loss = res.metrics["variants"]["v0"]["loss"]
    assert len(loss["series"]) == res.metrics["variants"]["v0"]["steps"] == 6
    assert loss["last"] < loss["first"]


@pytest.mark.slow
def test_lora_is_merged_and_a_killed_run_resumes(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    ctx = _ctx(tmp_path, tiny_model_dir, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
               learning_rate=1e-2)
    ctx.callbacks = [Kill()]
    with pytest.raises(KeyboardInterrupt):
        sft.run(ctx)
    ckpt = ctx.out_dir / "work" / "v0" / "checkpoint-2"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "tokenizer_config.json").exists()
    ctx.callbacks = []
    res = sft.run(ctx)
    assert res.metrics["variants"]["v0"]["resumed_from"] == "checkpoint-2"
    assert res.metrics["variants"]["v0"]["steps"] == 6
    out = ctx.run_dir / res.outputs["model"]
    assert not (out / "adapter_config.json").exists()
    merged, base = load_file(out / "model.safetensors"), load_file(Path(tiny_model_dir) / "model.safetensors")
    assert set(merged) == set(base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_long_context_mix_keeps_at_most_its_share_of_long_examples(tiny_tokenizer, tiny_model_dir, tmp_path):
    """Eight short examples and one long one at share 0.1%: the cap is floor(0.001*8/0.999) = 0."""
    from posttrain import data

    ctx = _ctx(tmp_path, tiny_model_dir, epochs=1)
    rows, _ = sft.encode_sft_examples(tiny_tokenizer, data.load_sft(ctx.inputs.sft_files), 128)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert lengths[-1] > lengths[-2]  # the multi-turn example is the one long example
    ctx.config = sft.SFTStageConfig(**{**ctx.config.model_dump(),
                                       "long_context": {"threshold_tokens": lengths[-2], "share": 0.001}})
    res = sft.run(ctx)
    mix = res.metrics["long_context_mix"]
    assert (mix["kept"], mix["dropped_by_reason"]) == (8, {"long_over_share": 1})
    assert (res.metrics["rows_read"], res.metrics["rows_trained"]) == (9, 8)
    assert res.metrics["dropped"] == {"long_over_share": 1}


def test_the_stage_counts_what_it_trained_on_per_variant(tiny_model_dir, tmp_path):
    """Top-1 rows and recipe data both count; a variant's data_fraction shows in rows_trained;
    dropped and truncated examples are counted; variant models before averaging lie under work/.
    At max_length 40 the top-1 row's prompt (49 tokens: its last turn is the only target) leaves
    no room and is dropped, while the same conversation as recipe data (first target at token 28)
    is truncated."""
    ctx = _ctx(tmp_path, tiny_model_dir, epochs=1, max_length=40,
               variants=[{}, {"data_fraction": 0.5, "seed": 3}])
    top1 = tmp_path / "top1.jsonl"
    top1.write_text(json.dumps({"id": "round_01/p", "messages": MULTI_TURN, "score": 1.0}) + "\n")
    ctx.inputs.top1_files = [str(top1)]
    res = sft.run(ctx)
    m = res.metrics
    assert m["examples_by_kind"] == {"top1": 1, "sft_data": 9}
    assert m["targets"] == {"top1": "last_turn", "sft_data": "all_turns"}
    assert (m["unit"], m["rows_read"], m["rows_trained"]) == ("examples", 10, 9)
    assert m["rows_trained_by_variant"] == {"v0": 9, "v1": round(9 * 0.5)}
    assert m["dropped"] == {"prompt_too_long": 1}
    assert m["truncated"] == 1
    assert (ctx.out_dir / "variants" / "v1" / "model" / "model.safetensors").exists()
    assert not (ctx.out_dir / "work" / "v1").exists()  # a finished variant's checkpoints are gone


# ---------------------------------------------------------------------------------------- packing


def _mixed_examples(n: int, seed: int = 0) -> list:
    """Conversations of mixed lengths (prompts of 1-30 numbers, answers of 1-40), one multi-turn."""
    import random

    rng = random.Random(seed)

    def numbers(k):
        return " ".join(str(rng.randrange(10)) for _ in range(k))

    out = [SFTExample(f"e{i}", [{"role": "user", "content": f"sort {numbers(rng.randrange(1, 30))}"},
                                {"role": "assistant", "content": numbers(rng.randrange(1, 40))}]) for i in range(n - 1)]
    return out + [SFTExample("multi", MULTI_TURN)]


def test_first_fit_bins_by_hand():
    from posttrain.packing import first_fit_bins

    # longest first: 9 opens bin 0 (room 1), 6 bin 1 (room 4), 5 bin 2 (room 5), 4 fits bin 1, 3 bin 2, 1 bin 0
    assert first_fit_bins([5, 9, 1, 6, 4, 3], 10) == [[1, 2], [3, 4], [0, 5]]
    assert first_fit_bins([12, 3], 10) == [[0], [1]]  # over the budget: a bin of its own
    assert first_fit_bins([4, 4, 4], 4) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="budget"):
        first_fit_bins([1], 0)


def test_pack_examples_lays_out_segments_positions_and_labels_by_hand():
    from posttrain.packing import pack_examples

    a = {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}
    b = {"input_ids": [20, 21], "labels": [20, 21]}  # a first label that is a target: nothing predicts it
    c = {"input_ids": [30, 31, 32, 33], "labels": [-100, -100, 32, 33]}
    out = pack_examples([a, b, c], pad_token_id=0)  # budget: the longest example, 4 tokens: no two fit
    assert out["input_ids"].tolist() == [[30, 31, 32, 33], [10, 11, 12, 0], [20, 21, 0, 0]]
    out = pack_examples([a, b, c], pad_token_id=0, budget=6)
    # c (4) opens row 0, a (3) row 1, b (2) fits row 0; a row keeps its examples in batch order
    assert out["input_ids"].tolist() == [[20, 21, 30, 31, 32, 33], [10, 11, 12, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0]]
    assert out["segment_ids"].tolist() == [[1, 1, 2, 2, 2, 2], [1, 1, 1, -1, -1, -1]]
    assert out["labels"].tolist() == [[-100, 21, -100, -100, 32, 33], [-100, 11, 12, -100, -100, -100]]
    with pytest.raises(ValueError, match="labels"):
        pack_examples([{"input_ids": [1, 2], "labels": [1]}], 0)


def _trainer(tiny_tokenizer, tiny_model_dir, tmp_path, rows, **cfg):
    trainer = sft.build_trainer(cfg=sft.SFTStageConfig(**cfg), variant=Variant(), seed=0,
                                init_model=Path(tiny_model_dir), tokenizer=tiny_tokenizer, rows=rows,
                                work_dir=tmp_path / "w")
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("packing_length", [None, 100, 400])
def test_packed_loss_and_gradients_equal_padded_rows(tiny_tokenizer, tiny_model_dir, tmp_path, packing_length):
    """One batch of 8 examples of mixed lengths: packed into fewer rows, the loss (the token mean
    over the batch's targets) and every gradient equal the padded batch's."""
    rows, _ = sft.encode_sft_examples(tiny_tokenizer, _mixed_examples(8), max_length=512)
    assert len({len(r["input_ids"]) for r in rows}) > 4  # mixed lengths
    results = {}
    for packing in (True, False):
        extra = {"packing_length": packing_length} if packing else {}
        trainer = _trainer(tiny_tokenizer, tiny_model_dir, tmp_path, rows, batch_size=8, packing=packing, **extra)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        results[packing] = (loss.item(), grads, batch, trainer._metrics["train"]["num_tokens"])
    (p_loss, p_grads, p_batch, p_tokens), (u_loss, u_grads, u_batch, u_tokens) = results[True], results[False]
    assert "segment_ids" in p_batch and p_batch["input_ids"].shape[0] < 8  # it packed
    assert p_loss == pytest.approx(u_loss, abs=1e-4)
    scale = max(g.abs().max().item() for g in u_grads.values())
    assert scale > 0
    for name, g in u_grads.items():
        assert (p_grads[name] - g).abs().max().item() <= 1e-4 * scale, name
    # the same target tokens count, and the logged token count is the real tokens in both
    assert (p_batch["labels"][:, 1:] != -100).sum() == (u_batch["labels"][:, 1:] != -100).sum()
    assert p_tokens == u_tokens == [sum(len(r["input_ids"]) for r in rows)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_block_mask_keeps_packed_examples_apart(tiny_tokenizer, tiny_model_dir, attn):
    """Changing example A's tokens leaves example B's logits in the same packed row unchanged, and
    B's logits are those of B in a row of its own (positions restarted)."""
    from posttrain.modeling import load_causal_lm
    from posttrain.packing import block_attention_mask, model_attention_mask, pack_examples

    model = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    model.set_attn_implementation(attn)
    a = {"input_ids": [5, 17, 23, 42, 8], "labels": [-100] * 5}
    b = {"input_ids": [9, 31, 7, 12], "labels": [-100] * 4}
    a2 = {"input_ids": [61, 3, 88, 14, 70], "labels": [-100] * 5}

    def logits(examples):
        batch = pack_examples(examples, pad_token_id=0, budget=9)
        assert batch["input_ids"].shape == (1, 9)
        mask = model_attention_mask(block_attention_mask(batch["segment_ids"]), model, torch.float32)
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                         use_cache=False).logits[0]

    first, changed = logits([a, b]), logits([a2, b])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits[0]
    assert (first[:5] - changed[:5]).abs().max() > 1e-3  # A's own logits did change
    assert torch.allclose(first[5:], changed[5:], atol=1e-6)
    assert torch.allclose(first[5:], alone, atol=1e-5)


def test_the_packing_keys_are_validated_and_stay_out_of_the_hash_at_their_defaults():
    from pydantic import ValidationError

    from posttrain.recipe import Recipe

    assert sft.SFTStageConfig().packing and sft.SFTStageConfig().packing_length is None
    with pytest.raises(ValidationError, match="packing_length is set but sft.packing is false"):
        sft.SFTStageConfig(packing=False, packing_length=512)
    with pytest.raises(ValidationError, match="packing_length"):
        sft.SFTStageConfig(packing_length=0)
    with pytest.raises(ValidationError, match="packing_len"):
        Recipe.model_validate({"name": "t", "models": {"base": "m"}, "sft": {"packing_len": 512}})
    # The defaults dump as before the keys existed (a run recorded then keeps its sft hash) ...
    assert "packing" not in sft.SFTStageConfig().model_dump()
    assert "packing_length" not in sft.SFTStageConfig().model_dump()
    # ... any other value is in the dump, so in the stage's hash
    assert sft.SFTStageConfig(packing=False).model_dump()["packing"] is False
    assert sft.SFTStageConfig(packing_length=256).model_dump()["packing_length"] == 256


def test_packing_falls_back_to_padded_rows_without_a_block_mask(caplog):
    from types import SimpleNamespace

    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    sdpa = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    assert sft.use_packing(sft.SFTStageConfig(), sdpa)
    assert not sft.use_packing(sft.SFTStageConfig(packing=False), sdpa)
    with caplog.at_level("WARNING", logger="posttrain.stages.sft"):
        assert not sft.use_packing(sft.SFTStageConfig(), flash)
    assert "flash_attention_2" in caplog.text and "padded" in caplog.text


def test_a_packed_stage_trains_the_weights_a_padded_one_does_and_records_its_packing(tiny_model_dir, tmp_path):
    """The stage end to end, 2 epochs of 3 steps (batch 3 of 9 examples, one multi-turn): packed
    and padded runs end with the same weights, and the record says how it packed."""
    from safetensors.torch import load_file

    weights, records = {}, {}
    for packing in (True, False):
        (tmp_path / str(packing)).mkdir()
        ctx = _ctx(tmp_path / str(packing), tiny_model_dir, packing=packing)
        records[packing] = sft.run(ctx).metrics["variants"]["v0"]
        weights[packing] = load_file(ctx.run_dir / "round_01" / "sft" / "model" / "model.safetensors")
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert max((weights[False][k] - base[k]).abs().max().item() for k in base) > 1e-3  # it trained
    assert max((weights[True][k] - weights[False][k]).abs().max().item() for k in base) < 1e-5
    packed, padded = records[True], records[False]
    assert packed["packed"] and not padded["packed"] and padded["packing"] is None
    assert packed["packing"]["examples"] == 2 * 9 and packed["packing"]["rows"] < 2 * 9
    assert packed["examples_per_row"] == pytest.approx(18 / packed["packing"]["rows"])
    assert packed["examples_per_row"] > 1
    assert padded["examples_per_row"] == 1.0
    assert packed["loss"]["series"] == pytest.approx(padded["loss"]["series"], abs=1e-4)
