"""The dpo stage: masks, loss, reference cache, resume, LoRA merge.

Every number is checked against a hand computation from the model's logits.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from posttrain.stages import dpo
from posttrain.stage import StageContext, headline

PAIRS = [
    ([{"role": "user", "content": "sort 3 1 2"}], "1 2 3", "3 2 1"),
    ([{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "add 2 5"}], "7", "25 maybe"),
    ([{"role": "user", "content": "count the numbers: 4, 4"}], "2", "the numbers are 4 and 4 and 4"),
    ([{"role": "user", "content": "reverse 1 2"}, {"role": "assistant", "content": "2 1"},
      {"role": "user", "content": "reverse 7 8 9"}], "9 8 7", "7 8 9"),
]


def _pairs():
    return [dpo.Pair(p, c, r, "preferences", f"test:{i}") for i, (p, c, r) in enumerate(PAIRS)]


def _rows(tok, mask_formatting=True):
    cfg = dpo.DPOStageConfig(max_length=128)
    rows, counts = dpo.encode_pairs(tok, _pairs(), cfg.model_copy(update={"mask_formatting": mask_formatting}))
    assert len(rows) == len(PAIRS) and not counts
    return rows


def _hand_token_logps(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for every t, from a plain forward and log_softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (L, V)
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # (L-1,)


# ---------------------------------------------------------------------------------------- math


def test_dpo_sigmoid_loss_matches_hand_numbers():
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -1.5])
    rc, rr = torch.tensor([-3.5, -1.0]), torch.tensor([-3.5, -1.0])
    got = dpo.dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1)
    # pair 1: margin (0.5) - (-0.5) = 1.0; pair 2: 0 - (-0.5) = 0.5
    want = torch.tensor([math.log1p(math.exp(-0.1)), math.log1p(math.exp(-0.05))])
    assert torch.allclose(got, want, atol=1e-6)


def test_token_mean_nll_is_mean_over_all_masked_tokens_of_the_batch():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert dpo.token_mean_nll(lp, mask).item() == pytest.approx((1 + 2 + 6) / 3)


# ---------------------------------------------------------------------------------------- pairs


class _Pref:
    def __init__(self, strength, edited=None, chosen="good", rejected="bad"):
        self.prompt = [{"role": "user", "content": "q"}]
        self.chosen, self.rejected, self.edited, self.strength = chosen, rejected, edited, strength
        self.source = "f.jsonl:1"


def test_preference_pairs_keep_strong_and_use_edited():
    prefs = [_Pref("significantly_better"), _Pref("better", edited="best"), _Pref("slightly_better"),
             _Pref("marginally_better"), _Pref(None), _Pref("better", chosen="same", rejected="same")]
    pairs, counts = dpo.preference_pairs(prefs, dpo.DPOStageConfig())
    assert [p.chosen for p in pairs] == ["good", "best", "good"]
    assert counts == Counter({"preferences/kept": 3, "preferences/edited_as_chosen": 1,
                              "preferences/dropped_strength_slightly_better": 1,
                              "preferences/dropped_strength_marginally_better": 1,
                              "preferences/dropped_identical_responses": 1})
    pairs, counts = dpo.preference_pairs(prefs, dpo.DPOStageConfig(use_edited=False, keep_unlabelled=False))
    assert [p.chosen for p in pairs] == ["good", "good"]
    assert counts["preferences/dropped_unlabelled"] == 1


def _write_samples(folder: Path, rows: list[dict]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shard_00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sample_row(i, responses, scores, finished=None):
    best = max(range(len(scores)), key=lambda k: -math.inf if scores[k] is None else scores[k])
    worst = min(range(len(scores)), key=lambda k: math.inf if scores[k] is None else scores[k])
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"sort {i} 1"}], "capability": None,
            "responses": responses, "n_tokens": [3] * len(responses),
            "finished": finished or [True] * len(responses), "scores": scores, "best": best, "worst": worst,
            "sampling": {}}


def test_on_policy_pairs_best_vs_worst_with_gap(tmp_path):
    _write_samples(tmp_path / "s", [
        _sample_row(0, ["a", "b", "c"], [0.1, 0.9, 0.5]),        # kept: b vs a, gap 0.8
        _sample_row(1, ["a", "b"], [0.5, 0.6]),                    # gap 0.1 <= 0.2
        _sample_row(2, ["a", "b"], [None, None]),                  # unscored
        _sample_row(3, ["a", "b"], [0.0, 1.0], [True, False]),     # best never finished
        _sample_row(4, ["x", "x"], [0.0, 1.0]),                    # identical texts
    ])
    pairs, counts = dpo.on_policy_pairs(tmp_path / "s", dpo.DPOStageConfig(on_policy_pairs=True, min_score_gap=0.2))
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a")]
    assert counts == Counter({"on_policy/kept": 1, "on_policy/dropped_small_gap": 1, "on_policy/dropped_unscored": 1,
                              "on_policy/dropped_unfinished_best": 1, "on_policy/dropped_identical": 1})


def test_on_policy_bad_row_names_file_row_field(tmp_path):
    row = _sample_row(0, ["a", "b"], [0.0, 1.0])
    row["best"] = 5
    _write_samples(tmp_path / "s", [_sample_row(1, ["a", "b"], [0.0, 1.0]), row])
    with pytest.raises(ValueError, match=r"shard_00000.jsonl: row 2: field 'best'"):
        dpo.on_policy_pairs(tmp_path / "s", dpo.DPOStageConfig(on_policy_pairs=True))


def test_encoded_pair_masks_only_the_end_of_turn_inside_the_response(tiny_tokenizer):
    eot = tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for row in _rows(tiny_tokenizer):
        for side in ("chosen", "rejected"):
            ids, loss, dmask = row[f"{side}_ids"], row[f"{side}_loss_mask"], row[f"{side}_dpo_mask"]
            assert ids[-1] == eot and loss == [1] * len(ids)
            assert dmask == [1] * (len(ids) - 1) + [0]
        # the prompt ends with the assistant header, as generation sees it
        assert tiny_tokenizer.decode(row["prompt_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    unmasked = _rows(tiny_tokenizer, mask_formatting=False)
    assert all(r["chosen_dpo_mask"] == r["chosen_loss_mask"] for r in unmasked)
    assert {r["uid"] for r in unmasked}.isdisjoint({r["uid"] for r in _rows(tiny_tokenizer)})


# ---------------------------------------------------------------------------------------- trainer


def _trainer(tok, model_dir, rows, tmp_path, *, cache_dir=None, mask_formatting=True, nll_in=False,
             precompute=True, nll_coef=0.2, packed=False, attn="sdpa"):
    from datasets import Dataset
    from trl import DPOConfig

    from posttrain.modeling import load_causal_lm

    cache = None
    if precompute:
        key = dpo.ref_cache_key("m", "float32", mask_formatting, [1, 2])
        cache = dpo.RefLogpCache(cache_dir or tmp_path / "cache", key)
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                     per_device_train_batch_size=len(rows), beta=0.1,
                     loss_type=["sigmoid", "sft"] if nll_coef else ["sigmoid"],
                     loss_weights=[1.0, nll_coef] if nll_coef else [1.0], precompute_ref_log_probs=precompute,
                     max_length=None, gradient_checkpointing=False, disable_tqdm=True)
    data = Dataset.from_list([{k: v for k, v in r.items() if k != "source"} for r in rows])
    def model():
        m = load_causal_lm(model_dir)
        m.set_attn_implementation(attn)
        return m

    ref_model = None if precompute else model()
    collator = (dpo.PackedPairCollator if packed else dpo.PairCollator)(tok.pad_token_id)
    trainer = dpo.masked_dpo_trainer_class()(
        model=model(), ref_model=ref_model, args=args, train_dataset=data, processing_class=tok,
        data_collator=collator, ref_cache=cache, mask_formatting_in_nll=nll_in)
    return trainer, cache


def _hand_sums(model, row, side, mask_key):
    ids = row["prompt_ids"] + row[f"{side}_ids"]
    lp = _hand_token_logps(model, ids)[len(row["prompt_ids"]) - 1:]  # predictions of the response tokens
    return (lp * torch.tensor(row[f"{side}_{mask_key}"], dtype=lp.dtype)).sum().item(), lp


@pytest.mark.parametrize("nll_in", [False, True])
def test_logps_and_nll_equal_hand_computation(tiny_tokenizer, tiny_model_dir, tmp_path, nll_in):
    from posttrain.modeling import load_causal_lm

    rows = _rows(tiny_tokenizer)
    trainer, _ = _trainer(tiny_tokenizer, tiny_model_dir, rows, tmp_path, nll_in=nll_in)
    hand_model = load_causal_lm(tiny_model_dir).eval()

    # reference sums (cached): formatting tokens excluded
    ds = trainer.train_dataset
    nll_num, nll_den, chosen_sums, rejected_sums = 0.0, 0, [], []
    for i, row in enumerate(rows):
        c_sum, c_lp = _hand_sums(hand_model, row, "chosen", "dpo_mask")
        r_sum, _ = _hand_sums(hand_model, row, "rejected", "dpo_mask")
        full_c, _ = _hand_sums(hand_model, row, "chosen", "loss_mask")
        assert abs(full_c - c_sum) > 1e-3  # the end-of-turn token really is left out
        assert ds[i]["ref_chosen_logps"] == pytest.approx(c_sum, abs=1e-4)
        assert ds[i]["ref_rejected_logps"] == pytest.approx(r_sum, abs=1e-4)
        chosen_sums.append(c_sum)
        rejected_sums.append(r_sum)
        nll_mask = row["chosen_dpo_mask"] if nll_in else row["chosen_loss_mask"]
        nll_num += -(c_lp * torch.tensor(nll_mask, dtype=c_lp.dtype)).sum().item()
        nll_den += sum(nll_mask)

    # policy == reference before training: each pair's DPO loss is exactly log 2
    batch = dpo.PairCollator(tiny_tokenizer.pad_token_id)([ds[i] for i in range(len(rows))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    nll = nll_num / nll_den
    assert trainer._metrics["train"]["nll"][-1] == pytest.approx(nll, rel=1e-4)
    assert loss == pytest.approx(math.log(2) + 0.2 * nll, rel=1e-4)
    # policy sums, per row and as the logged batch means: formatting tokens excluded too
    with torch.no_grad():
        per_tok, _ = trainer._per_token_logps(trainer.model, batch)
    sums = dpo.masked_logp_sum(per_tok, batch["dpo_mask"][:, 1:])
    assert sums.tolist() == pytest.approx(chosen_sums + rejected_sums, abs=1e-4)
    assert trainer._metrics["train"]["logps/chosen"][-1] == pytest.approx(sum(chosen_sums) / len(rows), rel=1e-4)
    assert trainer._metrics["train"]["logps/rejected"][-1] == pytest.approx(sum(rejected_sums) / len(rows),
                                                                            rel=1e-4)


def test_live_reference_gives_the_same_loss_as_cached(tiny_tokenizer, tiny_model_dir, tmp_path):
    rows = _rows(tiny_tokenizer)
    cached, _ = _trainer(tiny_tokenizer, tiny_model_dir, rows, tmp_path / "a")
    live, _ = _trainer(tiny_tokenizer, tiny_model_dir, rows, tmp_path / "b", precompute=False)
    coll = dpo.PairCollator(tiny_tokenizer.pad_token_id)
    b1 = coll([cached.train_dataset[i] for i in range(len(rows))])
    b2 = coll([live.train_dataset[i] for i in range(len(rows))])
    assert "ref_chosen_logps" not in b2
    assert cached.compute_loss(cached.model, b1).item() == pytest.approx(live.compute_loss(live.model, b2).item(),
                                                                         rel=1e-5)


def test_reference_cache_is_invalidated_when_the_masking_changes(tiny_tokenizer, tiny_model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    masked = _rows(tiny_tokenizer, mask_formatting=True)
    plain = _rows(tiny_tokenizer, mask_formatting=False)
    t1, c1 = _trainer(tiny_tokenizer, tiny_model_dir, masked, tmp_path / "1", cache_dir=cache_dir)
    assert (c1.computed, c1.hits) == (len(masked), 0)
    t2, c2 = _trainer(tiny_tokenizer, tiny_model_dir, plain, tmp_path / "2", cache_dir=cache_dir,
                      mask_formatting=False)
    assert c2.path != c1.path and (c2.computed, c2.hits) == (len(plain), 0)
    # same file key, different per-row masks: still recomputed, never reused
    t2b, c2b = _trainer(tiny_tokenizer, tiny_model_dir, plain, tmp_path / "2b", cache_dir=cache_dir)
    assert (c2b.computed, c2b.hits) == (len(plain), 0)
    assert t2b.train_dataset["ref_chosen_logps"] != pytest.approx(t1.train_dataset["ref_chosen_logps"])
    # a second variant with the same masking reuses every row
    t3, c3 = _trainer(tiny_tokenizer, tiny_model_dir, masked, tmp_path / "3", cache_dir=cache_dir)
    assert (c3.computed, c3.hits) == (0, len(masked))
    assert t3.train_dataset["ref_chosen_logps"] == t1.train_dataset["ref_chosen_logps"]
    assert dpo.ref_cache_key("m", "float32", True, [1, 2]) != dpo.ref_cache_key("m", "float32", True, [1, 3])


# ---------------------------------------------------------------------------------------- packed rows


def test_pack_pairs_layout_by_hand():
    ex = {"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31],
          "chosen_loss_mask": [1, 1], "rejected_loss_mask": [1], "chosen_dpo_mask": [1, 0], "rejected_dpo_mask": [1]}
    short = {"prompt_ids": [11], "chosen_ids": [21], "rejected_ids": [31], "chosen_loss_mask": [1],
             "rejected_loss_mask": [1], "chosen_dpo_mask": [1], "rejected_dpo_mask": [1]}
    b = dpo.pack_pairs([ex, short], pad_token_id=0)
    # prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected, then padding
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 13, 31], [11, 21, 11, 31, 0, 0, 0]]
    assert b["segment_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 2, 2, -1, -1, -1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 0, 0, 0]]
    # position t predicts shift_labels[t]; a segment's last token predicts nothing
    assert b["shift_labels"].tolist() == [[-100, -100, 21, 22, -100, 31, -100], [21, -100, 31, -100, -100, -100, -100]]
    # rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    assert b["completion_targets"].tolist() == [[0, 0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0],
                                                [0, 0, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0]]
    assert b["dpo_targets"].tolist()[0] == [0, 0, 1, 0, 0, 0, 0]


CHATML_PAIRS = [
    ([{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "sort 3 1 2"},
      {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "now reverse it"}],
     "3 2 1", "the numbers are 1 2 3 in order"),
    ([{"role": "user", "content": "add 2 5"}], "7", "25 maybe, or 7"),
    ([{"role": "user", "content": "count: 4, 4"}, {"role": "assistant", "content": "2"},
      {"role": "user", "content": "and 4, 4, 4?"}, {"role": "assistant", "content": "3"},
      {"role": "user", "content": "sum them"}], "20", "12"),
]


@pytest.fixture(scope="module")
def chatml_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_chatml_tokenizer

    tok = build_chatml_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=256, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("chatml") / "model"
    save_checkpoint(LlamaForCausalLM(config), tok, out)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_separate_rows_in_logps_loss_and_gradients(chatml_model_dir, tmp_path, attn):
    """Multi-turn ChatML prompts, formatting tokens masked out of the DPO term, the NLL term on."""
    from posttrain.modeling import load_tokenizer

    tok = load_tokenizer(chatml_model_dir)
    pairs = [dpo.Pair(p, c, r, "preferences", f"chatml:{i}") for i, (p, c, r) in enumerate(CHATML_PAIRS)]
    rows, counts = dpo.encode_pairs(tok, pairs, dpo.DPOStageConfig(max_length=256))
    assert len(rows) == len(CHATML_PAIRS) and not counts
    assert any(r["chosen_dpo_mask"] != r["chosen_loss_mask"] for r in rows)  # formatting really is masked
    sep, _ = _trainer(tok, chatml_model_dir, rows, tmp_path / "sep", attn=attn)
    pk, _ = _trainer(tok, chatml_model_dir, rows, tmp_path / "pk", packed=True, attn=attn)
    # the reference pass (cached) ran packed for one and separate for the other
    assert pk.train_dataset["ref_chosen_logps"] == pytest.approx(sep.train_dataset["ref_chosen_logps"], abs=1e-4)
    assert pk.train_dataset["ref_rejected_logps"] == pytest.approx(sep.train_dataset["ref_rejected_logps"], abs=1e-4)

    examples = [sep.train_dataset[i] for i in range(len(rows))]
    b_sep, b_pk = sep.data_collator(examples), pk.data_collator(examples)
    assert "segment_ids" in b_pk and b_pk["input_ids"].numel() < b_sep["input_ids"].numel()
    with torch.no_grad():
        lp_s, nll_s, dpo_s = sep._response_logps(sep.model, b_sep)
        lp_p, nll_p, dpo_p = pk._response_logps(pk.model, b_pk)
    for mask_s, mask_p in ((dpo_s, dpo_p), (nll_s, nll_p)):  # per-response sums under both masks
        assert mask_p.sum(1).tolist() == mask_s.sum(1).tolist()
        assert dpo.masked_logp_sum(lp_p, mask_p).tolist() == pytest.approx(
            dpo.masked_logp_sum(lp_s, mask_s).tolist(), abs=1e-4)
    # per token too: the i-th response token of each row
    for r in range(lp_s.shape[0]):
        tok_s = lp_s[r][nll_s[r].bool()]
        tok_p = lp_p[r][nll_p[r].bool()]
        assert torch.allclose(tok_s, tok_p, atol=1e-4)

    # one optimisation step's loss and gradients
    for trainer, batch in ((sep, b_sep), (pk, b_pk)):
        trainer.model.train()
        trainer.model.zero_grad()
        trainer._loss = trainer.compute_loss(trainer.model, batch)
        trainer._loss.backward()
    assert pk._loss.item() == pytest.approx(sep._loss.item(), abs=1e-5)
    grads_s = dict(sep.model.named_parameters())
    for name, p in pk.model.named_parameters():
        g_s = grads_s[name].grad
        assert torch.allclose(p.grad, g_s, atol=1e-5, rtol=1e-3), name


def test_live_reference_on_packed_rows_equals_the_cached_one(tiny_tokenizer, tiny_model_dir, tmp_path):
    rows = _rows(tiny_tokenizer)
    cached, _ = _trainer(tiny_tokenizer, tiny_model_dir, rows, tmp_path / "a", packed=True)
    live, _ = _trainer(tiny_tokenizer, tiny_model_dir, rows, tmp_path / "b", precompute=False, packed=True)
    b1 = cached.data_collator([cached.train_dataset[i] for i in range(len(rows))])
    b2 = live.data_collator([live.train_dataset[i] for i in range(len(rows))])
    assert "ref_chosen_logps" not in b2 and "segment_ids" in b2
    assert cached.compute_loss(cached.model, b1).item() == pytest.approx(live.compute_loss(live.model, b2).item(),
                                                                         rel=1e-5)


def test_packed_falls_back_to_separate_rows_without_a_block_mask(caplog):
    from types import SimpleNamespace

    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    sdpa = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    on, off = dpo.DPOStageConfig(), dpo.DPOStageConfig(packed=False)
    assert on.packed  # the default
    assert dpo.use_packed_rows(on, sdpa) and not dpo.use_packed_rows(off, sdpa)
    with caplog.at_level("WARNING", logger="posttrain.stages.dpo"):
        assert not dpo.use_packed_rows(on, flash)
    assert "flash_attention_2" in caplog.text and "separate" in caplog.text


# ---------------------------------------------------------------------------------------- stage


def _stage_ctx(tmp_path, model_dir, samples, **cfg):
    settings = dict(on_policy_pairs=True, pairs_from_preferences=False, batch_size=2, learning_rate=1e-3,
                    epochs=2, save_steps=2, logging_steps=1, max_length=128)
    settings.update(cfg)
    run_dir = tmp_path / "run"
    return StageContext(stage="dpo", round=1, run_dir=run_dir, out_dir=run_dir / "round_01" / "dpo",
                        config=dpo.DPOStageConfig(**settings),
                        inputs={"sft_model": str(model_dir), "preference_files": [], "samples": str(samples)})


def _samples(tmp_path):
    rows = [_sample_row(i, [f"{i} 1", f"1 {i} {i}", "no"], [1.0, 0.0, 0.5]) for i in range(2, 8)]
    _write_samples(tmp_path / "samples", rows)
    return tmp_path / "samples"


class _Killed(RuntimeError):
    pass


def _kill_at(step):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise _Killed(f"killed at step {step}")

    return Kill()


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    samples = _samples(tmp_path)
    full = dpo.run(_stage_ctx(tmp_path / "full", tiny_model_dir, samples))
    assert full.metrics["pairs_by_source"] == {"on_policy": 6}
    assert full.metrics["variants"]["v0"]["steps"] == 6

    ctx = _stage_ctx(tmp_path / "killed", tiny_model_dir, samples)
    ctx.callbacks = [_kill_at(3)]  # checkpoint-2 is complete, step 3 is lost
    with pytest.raises(_Killed):
        dpo.run(ctx)
    work = ctx.out_dir / "work" / "v0"
    assert (work / "checkpoint-2" / "COMPLETE").exists()
    assert (work / "checkpoint-2" / "tokenizer_config.json").exists()
    ctx.callbacks = []
    resumed = dpo.run(ctx)
    assert resumed.metrics["variants"]["v0"]["resumed_from"] == "checkpoint-2"
    assert full.metrics["variants"]["v0"]["resumed_from"] is None
    series = resumed.metrics["variants"]["v0"]["loss"]["series"]
    assert series == pytest.approx(full.metrics["variants"]["v0"]["loss"]["series"], rel=1e-4)
    assert resumed.metrics["ref_cache"]["hits"] == 6 and resumed.metrics["ref_cache"]["computed"] == 0
    a = load_file(tmp_path / "full" / "run" / full.outputs["variants"][0] / "model.safetensors")
    b = load_file(ctx.run_dir / resumed.outputs["variants"][0] / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.slow
def test_lora_output_is_merged_and_reloads(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ctx = _stage_ctx(tmp_path, tiny_model_dir, _samples(tmp_path), epochs=1,
                     lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, learning_rate=1e-2,
                     variants=[{}, {"seed": 5, "learning_rate": 5e-3}])
    res = dpo.run(ctx)
    assert res.outputs["variants"] == ["round_01/dpo/variants/v0/model", "round_01/dpo/variants/v1/model"]
    assert [k for k, _ in headline("dpo", res.metrics)] == ["acc", "pairs", "tok/s", "mfu"]  # what status shows
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert res.metrics["ref_cache"]["computed"] == 6 and res.metrics["ref_cache"]["hits"] == 6
    for rel in res.outputs["variants"]:
        out = ctx.run_dir / rel
        assert not (out / "adapter_config.json").exists()
        merged = load_file(out / "model.safetensors")
        assert set(merged) == set(base)  # plain names, no lora_A/lora_B
        assert any(not torch.equal(merged[k], base[k]) for k in base)
        model = AutoModelForCausalLM.from_pretrained(out)
        assert type(model).__name__ == "LlamaForCausalLM"
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        assert torch.isfinite(logits).all()
    m = res.metrics["variants"]["v0"]
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert len(m[key]["series"]) == m["steps"]


def test_build_pairs_reads_preference_files_and_samples(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    rows = [
        {"id": "a", "prompt": [{"role": "user", "content": "sort 2 1"}],
         "chosen": [{"role": "assistant", "content": "1 2"}], "rejected": [{"role": "assistant", "content": "2 1"}],
         "strength": "better"},
        {"id": "b", "prompt": [{"role": "user", "content": "sort 3 1"}],
         "chosen": [{"role": "assistant", "content": "1 3 3"}], "rejected": [{"role": "assistant", "content": "3"}],
         "edited": [{"role": "assistant", "content": "1 3"}], "strength": "significantly_better"},
        {"id": "c", "prompt": [{"role": "user", "content": "sort 4 1"}],
         "chosen": [{"role": "assistant", "content": "1 4"}], "rejected": [{"role": "assistant", "content": "4 1"}],
         "strength": "slightly_better"},
    ]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write_samples(tmp_path / "s", [_sample_row(0, ["a", "b"], [0.0, 1.0])])
    cfg = dpo.DPOStageConfig(on_policy_pairs=True)
    pairs, counts = dpo.build_pairs(cfg, [prefs], tmp_path / "s")
    assert [(p.source, p.chosen, p.rejected) for p in pairs] == [
        ("preferences", "1 2", "2 1"), ("preferences", "1 3", "3"), ("on_policy", "b", "a")]
    assert counts == {"on_policy/kept": 1, "preferences/dropped_strength_slightly_better": 1,
                      "preferences/edited_as_chosen": 1, "preferences/kept": 2, "preferences/read": 3}
    with pytest.raises(ValueError, match="no `samples` input"):
        dpo.build_pairs(cfg, [prefs], None)


def test_the_stage_counts_pairs_read_trained_dropped_and_truncated(tiny_model_dir, tmp_path):
    rows = [_sample_row(i, [f"{i} 1", f"1 {i} {i}", "no"], [1.0, 0.0, 0.5]) for i in range(2, 8)]
    rows.append(_sample_row(8, ["8 1", "1 8"], [None, None]))            # unscored: no pair
    rows.append(_sample_row(9, ["1 2 " * 40, "no"], [1.0, 0.0]))         # the chosen side is cut at max_length
    long_prompt = _sample_row(10, ["10 1", "no"], [1.0, 0.0])
    long_prompt["prompt"] = [{"role": "user", "content": "sort " + "9 " * 60}]  # no room for a response
    rows.append(long_prompt)
    _write_samples(tmp_path / "samples", rows)
    res = dpo.run(_stage_ctx(tmp_path, tiny_model_dir, tmp_path / "samples", epochs=1, max_length=48))
    m = res.metrics
    assert (m["unit"], m["rows_read"], m["rows_trained"], m["truncated"]) == ("pairs", 9, 7, 1)
    assert m["dropped"] == {"on_policy/too_long": 1, "on_policy/unscored": 1}
    assert m["rows_trained_by_variant"] == {"v0": 7} and m["pairs"] == 7
    assert m["variants"]["v0"]["packed"] is True  # the default, on an sdpa model
