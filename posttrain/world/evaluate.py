"""Measuring a model on the world's task: sample (or decode greedily) and score each response.

Plain transformers generation (`posttrain.engines.generate_messages`: batched, left padded),
in this process; what the build records in world.json and what `posttrain.world.evaluate_task`
gives a user.
"""

from __future__ import annotations

import os
from typing import Any

from posttrain import files
from posttrain.engines import generate_messages
from posttrain.world import task


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts]


def summarize_scores(prompts: list[list[dict]], generations: list[list[dict]]) -> dict[str, float]:
    """Mean task score, rate of responses that ended their turn, mean length in tokens."""
    scores, finished, lengths = [], [], []
    for p, gens in zip(prompts, generations):
        text = task.last_user_content(p)
        for g in gens:
            scores.append(task.score(text, g["text"]))
            finished.append(g["finished"])
            lengths.append(g["n_tokens"])
    k = max(len(scores), 1)
    return {
        "score": sum(scores) / k,
        "exact": sum(s == 1.0 for s in scores) / k,
        "eot_rate": sum(finished) / k,
        "mean_length": sum(lengths) / k,
        "n_responses": len(scores),
    }


def evaluate_model(model, tokenizer, prompts: list[list[dict]], *, n: int = 4,
                   temperature: float = 1.0, greedy: bool = False, max_new_tokens: int = 24,
                   seed: int = 0, batch_size: int = 256) -> dict[str, Any]:
    gens = generate_messages(model, tokenizer, prompts, n=n, temperature=temperature,
                              greedy=greedy, max_new_tokens=max_new_tokens, seed=seed,
                              batch_size=batch_size)
    gens = [g[:1] for g in gens] if greedy else gens  # greedy: one response is all of them
    result = summarize_scores(prompts, gens)
    result.update(n_prompts=len(prompts), samples_per_prompt=1 if greedy else n,
                  temperature=None if greedy else temperature, greedy=greedy)
    return result


def read_prompts(path: str | os.PathLike) -> list[list[dict]]:
    """The `prompt` message lists of a prompts file this module wrote."""
    rows = []
    for i, row in enumerate(files.iter_jsonl(path), start=1):
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or task.last_user_content(prompt) is None:
            raise ValueError(f"{path}: row {i}: field 'prompt' must be text or a message list "
                             f"with a user message")
        rows.append(prompt)
    return rows


def evaluate_task(model_dir: str | os.PathLike, prompts_path: str | os.PathLike, *, n: int = 4,
                  temperature: float = 1.0, greedy: bool = False, max_new_tokens: int = 24,
                  seed: int = 0, batch_size: int = 256, limit: int | None = None) -> dict[str, Any]:
    """Task score of the model in `model_dir` on the prompts of `prompts_path`.

    Samples `n` responses per prompt at `temperature` (or one greedy response) with the
    chat template, and returns {"score", "exact", "eot_rate", "mean_length", "n_responses",
    "n_prompts", "samples_per_prompt", "temperature", "greedy"}; score is the mean task
    score over all responses, exact the share scoring 1.0.
    """
    from posttrain.modeling import load_causal_lm, load_tokenizer

    prompts = read_prompts(prompts_path)[:limit]
    model = load_causal_lm(model_dir, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(model_dir)
    return evaluate_model(model, tokenizer, prompts, n=n, temperature=temperature, greedy=greedy,
                          max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
