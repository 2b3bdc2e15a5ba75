"""Pre-training the world's base model on noisy transcripts of the task.

The answers of the transcripts are echoed (`echo_share`) or corrupted (`corrupt_share`) with
some probability (`noisy_answer`), so the model learns the chat format and to end its turns but
answers right only part of the time: the headroom the post-training loop has to close.
`pretrain` is plain next-token training on the answer tokens. torch is imported inside.
"""

from __future__ import annotations

import random

from posttrain.world import task
from posttrain.world.config import WorldConfig
from posttrain.world.evaluate import render_prompts


def corrupt_answer(numbers: list[int], rng: random.Random) -> list[int]:
    """A wrong-ish answer: the sorted list with 1 to 3 random edits (swap two positions,
    replace, drop or duplicate a number). May by chance equal the right answer (e.g.
    swapping equal numbers); that is noise too."""
    out = sorted(numbers)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("swap", "replace", "drop", "dup"))
        i = rng.randrange(len(out))
        if op == "swap" and len(out) > 1:
            j = rng.randrange(len(out))
            out[i], out[j] = out[j], out[i]
        elif op == "replace":
            out[i] = rng.randint(0, task.MAX_VALUE)
        elif op == "drop" and len(out) > 1:
            del out[i]
        else:
            out.insert(i, out[i])
    return out


def noisy_answer(numbers: list[int], rng: random.Random, config: WorldConfig) -> list[int]:
    """A pre-training answer: the input echoed (echo_share), a corrupted sort
    (corrupt_share), else the right answer."""
    u = rng.random()
    if u < config.echo_share:
        return list(numbers)
    if u < config.echo_share + config.corrupt_share:
        return corrupt_answer(numbers, rng)
    return sorted(numbers)


def tokenizer_corpus(rng: random.Random, n: int = 2000) -> list[str]:
    corpus = ["system user assistant ipython", "Sort these numbers:"]
    for _ in range(n):
        item = task.random_item(rng)
        corpus += [item.prompt, item.answer]
    return corpus


def encode_transcripts(tokenizer, items: list[tuple[list[dict], str]], max_len: int | None = None):
    """Token ids and labels for (prompt messages, answer) pairs, right-padded to `max_len`
    (default: the longest pair).

    input_ids, labels: [N, max_len]; labels are -100 on the prompt and the padding, so only
    the assistant turn (its end-of-turn token included) is a target.
    """
    import torch

    prompts = render_prompts(tokenizer, [p for p, _ in items])
    fulls = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": a}], tokenize=False)
             for p, a in items]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    max_len = max_len or max(map(len, f_ids))
    ids = torch.full((len(items), max_len), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), max_len), -100, dtype=torch.long)
    for i, (p, f) in enumerate(zip(p_ids, f_ids)):
        if f[:len(p)] != p:
            raise AssertionError(f"transcript {i}: the prompt does not tokenize as a prefix of the transcript")
        if len(f) > max_len:
            raise ValueError(f"transcript {i} has {len(f)} tokens, more than max_len={max_len}")
        ids[i, :len(f)] = torch.tensor(f)
        labels[i, len(p):len(f)] = torch.tensor(f[len(p):])
    return ids, labels


def pretrain(model, ids, labels, config: WorldConfig, seed: int) -> list[float]:
    """Plain next-token training on the answer tokens; returns the loss every 50 steps."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.pretrain_steps - config.warmup_steps)
        return 1.0 - 0.9 * frac

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    # Trim the padding columns no transcript reaches.
    seq_used = int((labels != -100).nonzero()[:, 1].max()) + 1
    ids, labels = ids[:, :seq_used], labels[:, :seq_used]
    attn = torch.ones_like(ids)
    from posttrain.progress import bar

    model.train()
    log = []
    steps = bar(config.pretrain_steps, "world: pre-training the base model", unit="step")
    for step in range(config.pretrain_steps):
        steps.update()
        idx = torch.randint(0, ids.shape[0], (config.batch_size,), generator=gen)
        # Right padding sits after every target, so a causal model never attends to it from
        # a target position: the mask can stay all ones (and the batch a plain tensor).
        out = model(input_ids=ids[idx], attention_mask=attn[idx], labels=labels[idx])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == config.pretrain_steps - 1:
            log.append(round(out.loss.item(), 4))
    steps.close()
    model.eval()
    return log
