"""posttrain.chat.encode_conversation vs transformers' assistant-token mask, side by side.

    .venv/bin/python bench/chat_encode.py            # 400 conversations, 5 alternating runs
    .venv/bin/python bench/chat_encode.py --smoke    # seconds: 50 conversations, 1 run (what CI runs)

Both turn multi-turn conversations into token ids plus a mask of the assistant tokens:

- posttrain: `chat.encode_conversation` (one rendering, sentinel skeleton to locate
  contents, a prefix check per assistant turn, formatting mask); works with any template;
- baseline: `tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)`, which
  TRL's assistant-only loss uses; it only works with templates carrying
  `{% generation %}` markers (the tiny Llama 3 template has them).

The tiny template puts the end-of-turn token inside the generation block, so the two masks
must be identical: the script checks that on every conversation before timing. What is
measured is the price of posttrain's checks and formatting mask, in conversations/s
(ratio posttrain / baseline: below 1x means posttrain is slower).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = "sort reverse add count the numbers please answer briefly quick brown fox".split()


def make_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """n conversations of 1-3 user/assistant exchanges, optional system prompt."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS + [str(rng.randint(0, 99))]) for _ in range(k))

    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": text(6)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            conv += [{"role": "user", "content": text(rng.randint(5, 40))},
                     {"role": "assistant", "content": text(rng.randint(5, 80))}]
        out.append(conv)
    return out


def encode_posttrain(tok, convs):
    from posttrain import chat

    return [chat.encode_conversation(tok, c) for c in convs]


def encode_baseline(tok, convs):
    return [tok.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            for c in convs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds: 50 conversations, 1 run (what CI runs)")
    ap.add_argument("--n", type=int, default=None, help="conversations per run (default 400)")
    ap.add_argument("--runs", type=int, default=None, help="alternating runs (default 5)")
    args = ap.parse_args()
    n = args.n or (50 if args.smoke else 400)
    runs = args.runs or (1 if args.smoke else 5)

    from posttrain import chat
    from posttrain.world.tiny import build_tokenizer

    tok = build_tokenizer()
    convs = make_conversations(n)
    chat.formatting_token_ids(tok)  # derived once per tokenizer; not part of the per-row cost

    ours, base = encode_posttrain(tok, convs), encode_baseline(tok, convs)
    same = sum(o.input_ids == list(b["input_ids"]) and o.response_mask == list(b["assistant_masks"])
               for o, b in zip(ours, base))
    print(f"{n} conversations, {sum(len(o) for o in ours)} tokens; identical ids and masks: {same}/{n}")
    if same != n:
        raise SystemExit("the two ways disagree: fix that before timing")

    ratios = []
    for r in range(runs):
        rates = {}
        for name, fn in (("posttrain", encode_posttrain), ("baseline", encode_baseline)):
            t0 = time.perf_counter()
            fn(tok, convs)
            rates[name] = n / (time.perf_counter() - t0)
        ratios.append(rates["posttrain"] / rates["baseline"])
        print(f"run {r + 1}: posttrain {rates['posttrain']:.0f} conv/s, baseline {rates['baseline']:.0f} "
              f"conv/s, ratio {ratios[-1]:.2f}x")
    print(f"chat_encode: {statistics.mean(ratios):.2f}x conversations/s, posttrain encode_conversation vs "
          f"transformers assistant mask (min {min(ratios):.2f}x, max {max(ratios):.2f}x, {runs} runs, "
          f"masks identical {same}/{n})")


if __name__ == "__main__":
    main()
