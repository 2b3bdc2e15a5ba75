"""Generation backends: sampling math, the shared-prefill decoder, backend choice, the child process."""

from __future__ import annotations


import pytest
import torch

from posttrain import engines
from posttrain import generation as gen
from posttrain.engines import EngineOptions, TransformersGenerator
from posttrain.jobs import SamplingSettings, even_slices

PROMPTS = ["hello there", "sort 3 1 2 please now and then", "count",
           "The quick brown fox jumps over the lazy dog 7 8 9", "add 12 and 7"]


def eot_prone_model(tokenizer, eot_push: float, seed: int = 0):
    """A tiny random Llama that ends turns: residual dimension 0 is held at 0.1 (embedding
    column 0 set, no layer writes to it), so after the final RMSNorm h_0 > 0 at every
    position; with tied weights the EOT row's extra `eot_push` in column 0 adds
    eot_push * h_0 > 0 to the EOT logit only (the shared 0.1 shifts every logit equally)."""
    from posttrain.world.tiny import EOT, make_tiny_model

    model = make_tiny_model(tokenizer, seed=seed).eval()
    eot = tokenizer.convert_tokens_to_ids(EOT)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.1
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        emb[eot, 0] += eot_push
    return model


def varied_model(tokenizer, seed: int = 0):
    """Weights with std 0.08 instead of 0.02: greedy outputs vary instead of repeating one token."""
    from posttrain.world.tiny import make_tiny_model

    model = make_tiny_model(tokenizer, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08, generator=g)
    return model


def encode_prompts(tokenizer, texts=PROMPTS):
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              tokenize=False) for t in texts]
    return [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]


def eot_id(tokenizer):
    from posttrain.world.tiny import EOT

    return tokenizer.convert_tokens_to_ids(EOT)


# ---- sampling math against hand computations -------------------------------------------


def test_filter_top_p_keeps_smallest_set_reaching_p():
    # probabilities 0.05, 0.5, 0.15, 0.3 (unsorted on purpose); sorted: 0.5, 0.3, 0.15, 0.05.
    # mass before each: 0, 0.5, 0.8, 0.95 -> with top_p 0.8 keep 0.5 and 0.3 (0.8 >= 0.8 drops).
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    out = engines.filter_top_p(logits, 0.8)
    assert torch.isinf(out[0, 0]) and torch.isinf(out[0, 2])
    assert out[0, 1] == logits[0, 1] and out[0, 3] == logits[0, 3]
    # top_p 0.81 needs the third token too; a tiny top_p keeps the most likely one only.
    assert torch.isfinite(engines.filter_top_p(logits, 0.81)[0, 2])
    assert torch.isfinite(engines.filter_top_p(logits, 1e-6)).tolist() == [[False, True, False, False]]


def test_sample_next_greedy_and_nucleus_frequencies():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    assert engines.sample_next(logits, 0.0, 1.0).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([engines.sample_next(logits, 1.0, 0.8, g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    # renormalised nucleus: 0.5 / 0.8 = 0.625 and 0.3 / 0.8 = 0.375; nothing else.
    assert freq[0] == 0 and freq[2] == 0
    assert abs(freq[1].item() - 0.625) < 0.03


def test_left_pad_positions_count_real_tokens():
    ids, mask, pos = engines.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_split_is_contiguous_and_balanced():
    assert even_slices(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert even_slices(2, 4) == [(0, 1), (1, 2)]


def test_settings_validate_and_round_trip():
    s = SamplingSettings(k=3, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=2, stop_token_ids=[4, 5])
    assert SamplingSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0)
    with pytest.raises(ValueError, match="k must"):
        SamplingSettings(k=0)


# ---- the shared-prefill decoder ---------------------------------------------------------


@pytest.mark.parametrize("max_batch_sequences", [2, 64])
def test_shared_prefill_greedy_matches_generate_token_for_token(tiny_tokenizer, max_batch_sequences):
    """Greedy shared prefill (prompts of different lengths batched with left padding, sequences
    leaving the batch when they stop) equals plain `model.generate` run on each prompt alone."""
    model = varied_model(tiny_tokenizer)
    eot = eot_id(tiny_tokenizer)
    # a mild push on EOT so some greedy outputs stop early and others run to the limit
    push = torch.nn.functional.one_hot(torch.tensor(eot), model.config.vocab_size) * 2.0
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + push)
    try:
        prompts = encode_prompts(tiny_tokenizer)
        settings = SamplingSettings(k=2, temperature=0.0, max_new_tokens=24, stop_token_ids=(eot,))
        ours = TransformersGenerator(model=model, tokenizer=tiny_tokenizer,
                                     options=EngineOptions(max_batch_sequences=max_batch_sequences)
                                     ).generate(prompts, settings)
        lengths = set()
        for ids, g in zip(prompts, ours):
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=24, eos_token_id=[eot],
                                 pad_token_id=tiny_tokenizer.pad_token_id)[0, len(ids):].tolist()
            assert g.token_ids == [ref, ref]
            assert g.n_tokens == [len(ref)] * 2
            assert g.finished == [ref[-1] == eot] * 2
            assert g.texts[0] == tiny_tokenizer.decode(ref, skip_special_tokens=True)
            lengths.add(len(ref))
        assert min(lengths) < 24 and max(lengths) == 24  # both stopping and cut-off were exercised
    finally:
        hook.remove()


def test_sampling_stops_at_end_of_turn_and_is_seeded(tiny_tokenizer):
    model = eot_prone_model(tiny_tokenizer, eot_push=1.5)
    eot = eot_id(tiny_tokenizer)
    prompts = encode_prompts(tiny_tokenizer)
    gen_ = TransformersGenerator(model=model, tokenizer=tiny_tokenizer)
    settings = SamplingSettings(k=4, temperature=1.0, max_new_tokens=40, stop_token_ids=(eot,), seed=7)
    first = gen_.generate(prompts, settings)
    again = gen_.generate(prompts, settings)
    other = gen_.generate(prompts, SamplingSettings(**{**settings.to_dict(), "seed": 8}))
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    n_finished = 0
    for g in first:
        assert len(g.texts) == 4
        for ids, n, fin, reason in zip(g.token_ids, g.n_tokens, g.finished, g.finish_reasons):
            assert n == len(ids) and eot not in ids[:-1]  # nothing generated after a stop
            assert fin == (ids[-1] == eot) and reason == ("stop" if fin else "length")
            assert fin or n == 40
            n_finished += fin
        assert len({tuple(ids) for ids in g.token_ids}) > 1  # K independent samples, not one copied
    assert n_finished > 10


# ---- backend choice and the child process -----------------------------------------------


def test_backend_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(gen.VLLM_PYTHON_ENV, raising=False)
    assert gen.resolve_backend("transformers")[0] == "transformers"
    with pytest.raises(ValueError, match="unknown generation backend"):
        gen.resolve_backend("tgi")
    monkeypatch.setenv(gen.VLLM_PYTHON_ENV, str(tmp_path / "nope" / "python"))
    with pytest.raises(gen.GenerationError, match="no such interpreter"):
        gen.resolve_backend("auto")
    # an interpreter that exists but has no vllm is refused, not silently replaced
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    monkeypatch.setenv(gen.VLLM_PYTHON_ENV, str(stub))
    with pytest.raises(gen.GenerationError, match="vllm does not import"):
        gen.resolve_backend("vllm")


def test_generate_in_child_process_matches_in_process(tiny_tokenizer, tmp_path):
    from posttrain.modeling import save_checkpoint

    model_dir = save_checkpoint(eot_prone_model(tiny_tokenizer, eot_push=1.5), tiny_tokenizer, tmp_path / "m")
    prompts = encode_prompts(tiny_tokenizer)[:3]
    settings = SamplingSettings(k=3, temperature=1.0, max_new_tokens=16, stop_token_ids=(eot_id(tiny_tokenizer),),
                                seed=1)
    seen = []
    child = gen.generate(model_dir, prompts, settings, backend="transformers", workdir=tmp_path,
                         on_prompts=seen.append)
    here = TransformersGenerator(model_dir).generate(prompts, settings)
    assert seen and seen[-1] == 3 and seen == sorted(seen)  # progress for a bar, ending at every prompt
    assert [g.token_ids for g in child] == [g.token_ids for g in here]
    assert [g.texts for g in child] == [g.texts for g in here]
    assert list(tmp_path.glob("posttrain-gen-*")) == []  # request/response files cleaned up


def test_child_failure_names_backend_and_carries_its_error(tmp_path):
    settings = SamplingSettings(k=1, max_new_tokens=2)
    with pytest.raises(gen.GenerationError, match=r"transformers worker 0 \(exit 1\)[\s\S]*does-not-exist"):
        gen.generate(tmp_path / "does-not-exist", [[1, 2]], settings, backend="transformers")


def test_tokens_are_not_wasted_on_finished_sequences(tiny_tokenizer):
    """Sequences leave the batch at their stop token: the decoder's forward passes shrink."""
    model = eot_prone_model(tiny_tokenizer, eot_push=1.5)
    rows = []
    hook = model.register_forward_hook(lambda m, a, kw, o: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        settings = SamplingSettings(k=4, temperature=1.0, max_new_tokens=30, stop_token_ids=(eot_id(tiny_tokenizer),))
        out = TransformersGenerator(model=model, tokenizer=tiny_tokenizer).generate(
            encode_prompts(tiny_tokenizer)[:2], settings)
    finally:
        hook.remove()
    assert rows[0] == 2  # one prefill row per prompt, not per sample
    # decode rows summed = generated tokens minus the K first tokens drawn from the prefill logits
    total = sum(sum(g.n_tokens) for g in out)
    assert sum(rows[1:]) == total - 2 * 4
    assert len(rows) - 1 == max(max(g.n_tokens) for g in out) - 1  # one decode step per token after the first


def test_batch_progress_is_reported_without_changing_the_samples(tiny_tokenizer, tmp_path):
    model = eot_prone_model(tiny_tokenizer, eot_push=1.5)
    prompts = encode_prompts(tiny_tokenizer)
    settings = SamplingSettings(k=2, temperature=1.0, max_new_tokens=12, stop_token_ids=(eot_id(tiny_tokenizer),),
                                seed=3)
    generator = TransformersGenerator(model=model, tokenizer=tiny_tokenizer,
                                      options=EngineOptions(max_batch_sequences=4))
    done = []
    with_progress = generator.generate(prompts, settings, on_progress=done.append)
    plain = generator.generate(prompts, settings)
    assert [g.token_ids for g in with_progress] == [g.token_ids for g in plain]
    n = len(prompts)
    assert done == [min(i + 2, n) for i in range(0, n, 2)]  # batches of 4 sequences = 2 prompts x K=2
    out = str(tmp_path / "job.json")
    assert gen._prompts_done(out, 9) == 0
    gen._note_progress(out, 4)
    assert gen._prompts_done(out, 9) == 4
    (tmp_path / "job.json").write_text("{}")
    assert gen._prompts_done(out, 9) == 9
