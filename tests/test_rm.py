"""The `rm` stage: loss, pair expansion and filtering, packed rows, held-out metrics, training."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

import pytest
import torch

from posttrain.stages import rm
from posttrain.preferences import PreferenceFilter, rank
from posttrain.modeling import last_token_scores
from posttrain.stats import pearson
from posttrain.stage import headline


def expand(pref, keep, *, edited_strength=None, all_pairs=False, **settings):
    return rank(pref, PreferenceFilter(keep_strengths=keep, **settings), edited_strength=edited_strength,
                all_pairs=all_pairs)


@dataclass
class Pref:  # the fields of posttrain.data.Preference that rm reads
    id: str
    prompt: list
    chosen: str
    rejected: str
    edited: str | None = None
    strength: str | None = None
    capability: str | None = None
    source: str = "test:1"


KEEP = ["significantly_better", "better"]


# ----------------------------------------------------------------------------- loss


def test_bradley_terry_loss_matches_hand_computation():
    better = torch.tensor([1.0, 0.5])
    worse = torch.tensor([0.0, 1.5])
    # -log sigmoid(d) = log(1 + exp(-d)); d = 1 and -1
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert rm.bradley_terry_loss(better, worse).item() == pytest.approx(expected, abs=1e-6)
    margin = torch.tensor([0.5, 0.0])  # d = 0.5 and -1
    expected_m = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    assert rm.bradley_terry_loss(better, worse, margin).item() == pytest.approx(expected_m, abs=1e-6)


def test_margin_off_by_default_and_on_when_asked():
    cfg = rm.RMConfig()
    assert cfg.margin is False
    item = rm.EncodedRanking(prompt_ids=[1, 2], response_ids=[[3], [4], [5]], pairs=[(0, 1), (0, 2), (1, 2)],
                             strengths=["significantly_better", "better", "better"])
    batch = rm.pack_batch([item], pad_id=0, margins=cfg.margins if cfg.margin else None)
    assert "margin" not in batch
    # No margin column for TRL either: RewardTrainer applies a margin whenever the column exists.
    assert all("margin" not in row for row in rm.pairs_rows([item], None))

    on = rm.RMConfig(margin=True)
    batch = rm.pack_batch([item], pad_id=0, margins=on.margins)
    assert batch["margin"].tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert [r["margin"] for r in rm.pairs_rows([item], on.margins)] == pytest.approx([1.0, 2 / 3, 2 / 3])
    custom = rm.RMConfig(margin=True, margins={"significantly_better": 3.0, "better": 2.0})
    assert rm.pack_batch([item], 0, custom.margins)["margin"].tolist() == [3.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="no value for"):
        rm.RMConfig(margin=True, margins={"better": 1.0})
    with pytest.raises(ValueError, match="unknown strength"):
        rm.RMConfig(keep_strengths=["better", "much_better"])


# ----------------------------------------------------------------------------- pairs and filtering


def test_three_way_ranking_gives_every_ordered_pair():
    p = Pref("a", [{"role": "user", "content": "q"}], chosen="C", rejected="R", edited="E", strength="better")
    r, drops = expand(p, KEEP)
    assert r.responses == ["E", "C", "R"]
    assert r.pairs == [(0, 1), (0, 2), (1, 2)]
    assert r.strengths == ["better"] * 3
    assert not drops


def test_strength_filter_counts_pairs_by_reason():
    p = Pref("a", [{"role": "user", "content": "q"}], chosen="C", rejected="R", edited="E", strength="slightly_better")
    r, drops = expand(p, KEEP)
    assert r is None and drops == {"strength_slightly_better": 3}
    # The edit pairs may carry their own strength: then only chosen-vs-rejected is dropped, and
    # the ranking keeps all three responses (E is above both).
    r, drops = expand(p, KEEP, edited_strength="significantly_better")
    assert r.responses == ["E", "C", "R"] and r.pairs == [(0, 1), (0, 2)]
    assert r.strengths == ["significantly_better"] * 2
    assert drops == {"strength_slightly_better": 1}
    # Keeping slightly_better too: all three pairs.
    r, drops = expand(p, KEEP + ["slightly_better"])
    assert len(r.pairs) == 3 and not drops
    # Without the edit: one pair, and the two unused edit pairs are counted.
    q = Pref("b", [{"role": "user", "content": "q"}], chosen="C", rejected="R", edited="E", strength="better")
    r, drops = expand(q, KEEP, use_edited=False)
    assert r.responses == ["C", "R"] and r.pairs == [(0, 1)] and drops == {"edited_unused": 2}
    # Unlabelled rows: kept by default, dropped on request.
    u = Pref("c", [{"role": "user", "content": "q"}], chosen="C", rejected="R")
    assert expand(u, KEEP)[0].pairs == [(0, 1)]
    assert expand(u, KEEP, keep_unlabelled=False) == (None, {"unlabelled": 1})
    # An edit identical to the chosen response carries no preference.
    d = Pref("d", [{"role": "user", "content": "q"}], chosen="C", rejected="R", edited="C", strength="better")
    r, drops = expand(d, KEEP)
    assert r.pairs == [(0, 2), (1, 2)] and drops == {"identical_responses": 1}
    # Held-out evaluation sees every strength.
    r, drops = expand(p, KEEP, all_pairs=True)
    assert len(r.pairs) == 3 and not drops


def test_expand_rankings_sums_drops_over_rows():
    prompt = [{"role": "user", "content": "q"}]
    prefs = [Pref("1", prompt, "a", "b", strength="better"), Pref("2", prompt, "a", "b", strength="marginally_better"),
             Pref("3", prompt, "a", "b", edited="e", strength="slightly_better")]
    rankings, drops = rm.expand_rankings(prefs, rm.RMConfig())
    assert [r.id for r in rankings] == ["1"]
    assert drops == {"strength_marginally_better": 1, "strength_slightly_better": 3}


def test_shuffle_keeps_pairs_pointing_at_the_same_responses():
    item = rm.EncodedRanking([1], [[10], [20], [30]], [(0, 1), (0, 2), (1, 2)], ["better"] * 3)
    for seed in range(5):
        s = rm.shuffle_responses(item, random.Random(seed))
        named = [(s.response_ids[a][0], s.response_ids[b][0]) for a, b in s.pairs]
        assert named == [(10, 20), (10, 30), (20, 30)]


# ----------------------------------------------------------------------------- packed rows


def test_block_attention_mask_by_hand():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = rm.block_attention_mask(seg)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # response 2 sees the prompt and itself, not response 1
        [0, 0, 0, 0, 0, 1],  # padding sees only itself (no empty softmax row)
    ]


def test_pack_batch_layout():
    a = rm.EncodedRanking([1, 2, 3], [[4, 5], [6]], [(0, 1)], ["better"])
    b = rm.EncodedRanking([7], [[8], [9, 9], [5]], [(2, 0), (2, 1)], ["better", None])
    batch = rm.pack_batch([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 9, 5, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 1, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 3, -1]]
    assert batch["last_index"].tolist() == [[4, 5, -1], [1, 3, 4]]
    assert batch["better"].tolist() == [0, 5, 5] and batch["worse"].tolist() == [1, 3, 4]


def _classifier(model_dir, attn):
    torch.manual_seed(1)
    model = rm.load_reward_model(model_dir, attn_implementation=attn)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a non-trivial head
    return model.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scores_equal_separate_rows(tiny_model_dir, attn):
    model = _classifier(tiny_model_dir, attn)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    pad = model.config.pad_token_id

    def ids(n):
        return [int(t) for t in torch.randint(10, vocab, (n,), generator=g) if t != pad] or [11]

    items = [rm.EncodedRanking(ids(20), [ids(7), ids(12), ids(3)], [(0, 1), (0, 2), (1, 2)], ["better"] * 3),
             rm.EncodedRanking(ids(9), [ids(15), ids(5)], [(0, 1)], ["better"])]
    with torch.no_grad():
        packed = rm.packed_scores(model, rm.pack_batch(items, pad))  # [2, 3]
        rows = [it.prompt_ids + r for it in items for r in it.response_ids]
        L = max(map(len, rows))
        input_ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
        separate = last_token_scores(model, input_ids, mask)
        # The stock HF classifier (score at the last non-pad token) agrees too.
        hf = model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1)
    got = [packed[0, 0], packed[0, 1], packed[0, 2], packed[1, 0], packed[1, 1]]
    assert torch.stack(got).tolist() == pytest.approx(separate.tolist(), abs=1e-4)
    assert separate.tolist() == pytest.approx(hf.tolist(), abs=1e-4)
    assert separate.std() > 0.01  # the scores differ, so equality is not trivial


def test_packed_loss_gradient_matches_separate_rows(tiny_model_dir):
    model = _classifier(tiny_model_dir, "sdpa")
    item = rm.EncodedRanking([5, 6, 7, 8], [[20, 21], [30], [40, 41, 42]], [(0, 1), (0, 2), (1, 2)], ["better"] * 3)
    loss, _ = rm.packed_loss(model, rm.pack_batch([item], 0))
    loss.backward()
    g_packed = model.score.weight.grad.clone()
    model.zero_grad()
    rows = [item.prompt_ids + r for r in item.response_ids]
    L = max(map(len, rows))
    s = last_token_scores(model, torch.tensor([r + [0] * (L - len(r)) for r in rows]),
                             torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows]))
    loss2 = rm.bradley_terry_loss(s[[0, 0, 1]], s[[1, 2, 2]])
    loss2.backward()
    assert loss.item() == pytest.approx(loss2.item(), abs=1e-5)
    assert torch.allclose(g_packed, model.score.weight.grad, atol=1e-5)


def test_encode_ranking_with_chat_template(tiny_tokenizer):
    from posttrain import chat

    prompt = [{"role": "user", "content": "sort 3 1 2"}]
    r = rm.Ranking("x", "f:1", prompt, ["1 2 3", "1 3 2", "3 2 1 0 0 0 0 0 0 0 0 0 0"], [(0, 1), (0, 2), (1, 2)],
                   ["better"] * 3)
    enc, drops = rm.encode_ranking(tiny_tokenizer, r, max_length=10_000)
    full = chat.encode_example(tiny_tokenizer, prompt, "1 3 2").input_ids
    assert enc.prompt_ids + enc.response_ids[1] == full
    eot = tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert all(resp[-1] == eot for resp in enc.response_ids) and not drops
    limit = len(enc.prompt_ids) + len(enc.response_ids[1])  # the long third response no longer fits
    enc, drops = rm.encode_ranking(tiny_tokenizer, r, max_length=limit)
    assert drops == {"too_long": 2} and enc.pairs == [(0, 1)] and len(enc.response_ids) == 2


# ----------------------------------------------------------------------------- metrics


def test_heldout_metrics_by_hand():
    scored = [
        ([3.0, 2.0, 1.0], [(0, 1), (0, 2), (1, 2)], ["better"] * 3),       # all right, full order right
        ([1.0, 2.0, 0.0], [(0, 1), (0, 2), (1, 2)], ["significantly_better"] * 3),  # 2 of 3 right
        ([0.0, 1.0], [(0, 1)], ["slightly_better"]),                         # wrong, not a kept strength
    ]
    m = rm.heldout_metrics(scored, KEEP)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["accuracy_all"] == pytest.approx(5 / 7)
    assert m["mean_margin"] == pytest.approx((1 + 2 + 1 - 1 + 1 + 2) / 6)
    assert m["accuracy_by_strength"] == {"better": 1.0, "significantly_better": pytest.approx(2 / 3),
                                         "slightly_better": 0.0}
    assert m["full_order_accuracy"] == 0.5 and m["full_order_rankings"] == 2


def test_length_health_by_hand():
    # (scores, lengths in tokens, pairs, strengths); pairs of unkept strengths are left out
    scored = [
        ([3.0, 2.0, 1.0], [5, 10, 20], [(0, 1), (0, 2), (1, 2)], ["better"] * 3),  # shorter better, all right
        ([1.0, 2.0], [30, 10], [(0, 1)], ["significantly_better"]),  # longer better, wrong
        ([0.0, 5.0], [8, 8], [(0, 1)], ["better"]),                  # equal lengths: in neither share
        ([4.0, 1.0], [2, 40], [(0, 1)], ["slightly_better"]),        # not a kept strength
        ([0.5, 1.5], [3, 6], [(0, 1)], [None]),                      # unlabelled counts; shorter better, wrong
    ]
    m = rm.length_health(scored, KEEP)
    # better is shorter in 4 kept pairs: three from the first ranking (right), the last (wrong)
    assert (m["accuracy_chosen_shorter"], m["pairs_chosen_shorter"]) == (0.75, 4)
    # unequal lengths in 5 kept pairs; the longer one scores higher only in the last
    assert m["prefers_longer"] == pytest.approx(1 / 5)
    scores = [x for s, *_ in scored for x in s]
    lengths = [x for _, n, *_ in scored for x in n]
    assert m["score_length_correlation"] == pytest.approx(statistics.correlation(scores, lengths))


def test_pearson_by_hand():
    # mean x = 2, mean y = 13/3; sxy = 5, sxx = 2, syy = 114/9
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)
    assert pearson([1], [2]) is None and pearson([1, 1], [2, 3]) is None


def test_heldout_accuracy_gate():
    rm.check_heldout_accuracy({"accuracy": 0.55, "pairs": 20}, 0.55)  # at the threshold: passes
    rm.check_heldout_accuracy({"accuracy": None}, 0.55)  # nothing held out: nothing to check
    rm.check_heldout_accuracy({"accuracy": 0.2, "pairs": 20}, 0.0)  # turned off
    with pytest.raises(rm.RewardModelTooWeak) as err:
        rm.check_heldout_accuracy({"accuracy": 0.349, "pairs": 43, "prefers_longer": 0.58,
                                   "accuracy_chosen_shorter": 0.2, "score_length_correlation": 0.46}, 0.55)
    text = str(err.value)
    for part in ("0.349", "43 pairs", "rm.min_heldout_accuracy=0.55", "58%", "0.46", "lower"):
        assert part in text, part


def test_a_weak_reward_model_stops_the_stage_and_a_lower_threshold_continues_without_retraining(
        tmp_path, tiny_model_dir, monkeypatch):
    train = _synthetic_preferences(tmp_path / "train.jsonl", 16, seed=0)
    held = _synthetic_preferences(tmp_path / "held.jsonl", 4, seed=1)
    cfg = rm.RMConfig(learning_rate=1e-3, epochs=1, batch_size=8, logging_steps=1000, save_steps=1000)
    ctx = _ctx(tmp_path, cfg, tiny_model_dir, train, [held])
    real = rm.evaluate_rankings

    def weak(*args, **kwargs):  # whatever the tiny model learned, score it as a weak one
        return {**real(*args, **kwargs), "accuracy": 0.4}

    monkeypatch.setattr(rm, "evaluate_rankings", weak)
    with pytest.raises(rm.RewardModelTooWeak, match="0.400"):
        rm.run(ctx)
    assert (ctx.out_dir / "model" / "config.json").is_file()  # the model is kept for a second look

    def no_training(*args, **kwargs):
        raise AssertionError("the finished reward model was trained again")

    monkeypatch.setattr(rm, "train_packed", no_training)
    ctx.config = cfg.model_copy(update={"min_heldout_accuracy": 0.3})
    m = rm.run(ctx).metrics
    assert (m["heldout"]["accuracy"], m["heldout"]["min_accuracy"]) == (0.4, 0.3)
    for key in ("accuracy_chosen_shorter", "pairs_chosen_shorter", "prefers_longer", "score_length_correlation"):
        assert key in m["heldout"], key
    assert (m["unit"], m["rows_trained"], m["rows_trained_by_variant"]) == ("pairs", m["pairs"], {"v0": m["pairs"]})
    assert m["rows_read"] == m["pairs"] + sum(m["dropped"].values())


def test_split_heldout_is_seeded():
    items = list(range(40))
    a = rm.split_heldout(items, 0.1, seed=3)
    assert a == rm.split_heldout(items, 0.1, seed=3)
    assert len(a[1]) == 4 and sorted(a[0] + a[1]) == items
    assert rm.split_heldout(items, 0.0, seed=3) == (items, [])


# ----------------------------------------------------------------------------- the stage


def _synthetic_preferences(path, n, seed):
    """Rankings whose better responses say "good" more often: a feature a tiny model learns fast."""
    from posttrain.files import write_jsonl

    rng = random.Random(seed)
    words = ["the", "sky", "is", "a", "of", "box", "red", "blue"]
    rows = []
    for i in range(n):
        def filler():
            return " ".join(rng.choice(words) for _ in range(3))
        rows.append({"id": f"r{i}", "prompt": [{"role": "user", "content": f"tell me {filler()}"}],
                     "edited": f"good {filler()} good", "chosen": f"{filler()} good", "rejected": filler(),
                     "strength": rng.choice(["significantly_better", "better", "slightly_better"])})
    write_jsonl(path, rows)
    return path


def _ctx(tmp_path, cfg, base, train, heldout=()):
    from posttrain.stage import StageContext

    out = tmp_path / "run" / "round_01" / "rm"
    return StageContext(stage="rm", round=1, run_dir=tmp_path / "run", out_dir=out, config=cfg,
                        inputs={"base_model": str(base), "preference_files": [str(train)],
                                "heldout_preference_files": [str(h) for h in heldout]}, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False])
def test_trained_rm_beats_chance_on_heldout(tmp_path, tiny_model_dir, packing):
    train = _synthetic_preferences(tmp_path / "train.jsonl", 96, seed=0)
    held = _synthetic_preferences(tmp_path / "held.jsonl", 40, seed=1)
    # The same number of optimizer steps either way: 8 rankings hold about 24 pairs.
    cfg = rm.RMConfig(packing=packing, learning_rate=2e-3, epochs=2, batch_size=8 if packing else 24,
                      logging_steps=1000, save_steps=1000)
    res = rm.run(_ctx(tmp_path, cfg, tiny_model_dir, train, [held]))
    m = res.metrics
    assert res.outputs == {"model": "round_01/rm/model"}
    assert [k for k, _ in headline("rm", m)] == ["acc", "rankings", "longer", "tok/s", "mfu"]  # what status shows
    assert (tmp_path / "run" / "round_01" / "rm" / "model" / "config.json").is_file()
    assert m["filter"]["dropped_by_reason"] == {"strength_slightly_better": m["filter"]["dropped"]}
    assert m["pairs"] == m["filter"]["kept"] and m["heldout"]["rankings"] == 40
    print("held-out", "packed" if packing else "pairs", m["heldout"])
    assert m["heldout"]["accuracy"] >= 0.9  # chance is 0.5
    assert m["heldout"]["full_order_rankings"] == 40
    assert m["heldout"]["full_order_accuracy"] >= 0.6  # chance is 1/6


@pytest.mark.slow
def test_variants_are_averaged_and_finished_work_is_skipped(tmp_path, tiny_model_dir):
    from posttrain.training import Variant

    train = _synthetic_preferences(tmp_path / "train.jsonl", 40, seed=0)
    cfg = rm.RMConfig(learning_rate=1e-3, epochs=1, batch_size=8, variants=[Variant(), Variant(seed=7)],
                      heldout_fraction=0.2, min_heldout_accuracy=0)  # 8 held-out rankings: no gate
    ctx = _ctx(tmp_path, cfg, tiny_model_dir, train)
    res = rm.run(ctx)
    out = ctx.out_dir
    assert (out / "variants" / "v0" / "model").is_dir() and (out / "variants" / "v1" / "model").is_dir() and (out / "model").is_dir()
    assert set(res.metrics["variants"]) == {"v0", "v1"} and res.metrics["variants"]["v1"]["seed"] == 7
    # The output is the average of the two variants' weights.
    from safetensors.torch import load_file

    w = [load_file(str(out / d / "model.safetensors"))["score.weight"] for d in ("variants/v0/model", "variants/v1/model", "model")]
    assert torch.allclose(w[2], (w[0] + w[1]) / 2, atol=1e-6)
    again = rm.run(ctx)  # both variants complete: nothing is retrained
    assert again.metrics["variants"] == res.metrics["variants"]


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_model(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from posttrain import training

    train = _synthetic_preferences(tmp_path / "train.jsonl", 24, seed=0)
    cfg = rm.RMConfig(learning_rate=1e-3, epochs=2, batch_size=4, save_steps=2, heldout_fraction=0)
    straight = rm.run(_ctx(tmp_path / "a", cfg, tiny_model_dir, train))
    steps = straight.metrics["variants"]["v0"]["steps"]
    assert steps == 2 * math.ceil(straight.metrics["rankings"] / 4) > 3

    real_callback = training.complete_marker_callback

    class MarkThenStopAfterStep3(type(real_callback())):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # killed after checkpoint-2 was saved and marked
                raise _Interrupted
            return control

    monkeypatch.setattr(training, "complete_marker_callback", MarkThenStopAfterStep3)
    ctx = _ctx(tmp_path / "b", cfg, tiny_model_dir, train)
    with pytest.raises(_Interrupted):
        rm.run(ctx)
    assert training.last_complete_checkpoint(ctx.out_dir / "work" / "v0").endswith("checkpoint-2")
    monkeypatch.setattr(training, "complete_marker_callback", real_callback)
    resumed = rm.run(ctx)  # continues from checkpoint-2
    assert resumed.metrics["variants"]["v0"]["steps"] == steps
    a = load_file(str(tmp_path / "a" / "run" / "round_01" / "rm" / "model" / "model.safetensors"))
    b = load_file(str(ctx.out_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert not (ctx.out_dir / "work" / "v0").exists()  # superseded by the final model


@pytest.mark.slow
def test_rm_on_the_embedded_world_ranks_heldout_preferences(tmp_path):
    """Round 1's preference batch of the demo world, the world's base model, its held-out rankings.

    Measured when written: accuracy 0.851 on kept strengths (0.966 significantly_better,
    0.742 better), 0.813 over all held-out pairs; 0.741 on kept strengths on another machine
    (each machine builds its own world on its own floats). Chance is 0.5.
    """
    from posttrain.stage import StageContext
    from posttrain.world.build import ensure_world

    w = ensure_world()
    cfg = rm.RMConfig(learning_rate=1e-3, epochs=3, batch_size=8, logging_steps=1000, save_steps=1000)
    out = tmp_path / "run"
    ctx = StageContext(stage="rm", round=1, run_dir=out, out_dir=out / "round_01" / "rm", config=cfg,
                       inputs={"base_model": str(w.base_model), "preference_files": [str(w.preferences(1))],
                               "heldout_preference_files": [str(w.heldout_preferences)]}, seed=0)
    m = rm.run(ctx).metrics
    assert m["heldout"]["accuracy"] >= 0.7
    assert m["heldout"]["accuracy_by_strength"]["significantly_better"] >= 0.8
