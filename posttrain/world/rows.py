"""The rows of the world's data files: seed SFT rows and the simulated preference batches.

`seed_sft_rows`: the right answer to each item, with the opt-in noise (`sft_noisy_share`,
`sft_duplicate_share`) that gives curation something to clean. `annotate`: two responses per
prompt from the base model under two sampling setups, labelled by the world's simulated
annotators (posttrain.world.annotator), one preference batch per round.
"""

from __future__ import annotations

import random

from posttrain.data import STRENGTHS
from posttrain.engines import generate_messages
from posttrain.world import task
from posttrain.world.annotator import simulated_judgement
from posttrain.world.config import WorldConfig


NOISY_ANSWERS = (
    "I'm sorry, here it is: {answer}",
    "{answer}!!! \U0001F60A\U0001F60A\U0001F60A",
    "I apologize for the wait! {answer}!",
    "\U0001F389\U0001F389 {answer} \U0001F389\U0001F389",
)
"""How a careless writer pads the right answer (world setting `sft_noisy_share`)."""


def seed_sft_rows(items: list[task.TaskItem], config: WorldConfig, rng: random.Random) -> list[dict]:
    """The seed SFT rows: each item's right answer; with the opt-in settings on, a share of them
    padded (`sft_noisy_share`) and extra near-duplicates (`sft_duplicate_share`). With both at 0
    `rng` is never drawn from, so the default world's file is unchanged."""
    rows = []
    for i, it in enumerate(items):
        answer = it.answer
        if config.sft_noisy_share > 0 and rng.random() < config.sft_noisy_share:
            answer = rng.choice(NOISY_ANSWERS).format(answer=answer)
        rows.append({"id": f"sft_seed-{i:04d}", "messages": it.messages() + [{"role": "assistant", "content": answer}]})
    n_dup = round(config.sft_duplicate_share * len(items))
    for j in range(n_dup):
        src = rows[rng.randrange(len(rows))]
        numbers = list(task.parse_prompt(src["messages"][0]["content"]))
        rng.shuffle(numbers)
        dup = task.TaskItem(tuple(numbers))
        rows.append({"id": f"sft_seed-dup{j:04d}",
                     "messages": dup.messages() + [{"role": "assistant", "content": src["messages"][-1]["content"]}]})
    return rows


def usable_response(generation: dict) -> str | None:
    """The text of a sampled response an annotator may rank, or None.

    Empty responses (after stripping) are rejected by posttrain's own preference validator,
    and unfinished ones (cut at max_new_tokens) are not a turn a person would rank: which of
    them a model produces depends on the machine's floating point, so both are filtered
    here, not assumed away.
    """
    text = generation["text"].strip()
    if not text or not generation["finished"]:
        return None
    return text


def annotate(model, tokenizer, items: list[task.TaskItem], config: WorldConfig, rng: random.Random,
             seed: int, id_prefix: str) -> tuple[list[dict], dict[str, int]]:
    """Simulated annotators: two responses per prompt from two sampling setups, labelled by
    `posttrain.world.annotator.simulated_judgement` (the better by task score is chosen,
    strength from the score gap, and on a share of rows an edit that fixes the chosen
    response: the reference answer). The annotate step's WorldAnnotator uses the same rule.

    A pair is dropped, and counted, when a response is empty or unfinished (`usable_response`)
    or when the two score the same (a tie, identical responses included).
    """
    prompts = [it.messages() for it in items]
    t_a, t_b = config.annotation_temperatures
    gen_a = generate_messages(model, tokenizer, prompts, n=1, temperature=t_a,
                               max_new_tokens=config.max_new_tokens, seed=seed)
    gen_b = generate_messages(model, tokenizer, prompts, n=1, temperature=t_b,
                               max_new_tokens=config.max_new_tokens, seed=seed + 1)
    rows = []
    counts = {"ties": 0, "empty": 0, "unfinished": 0, "edited": 0, **{s: 0 for s in STRENGTHS}}
    for i, (it, a, b) in enumerate(zip(items, gen_a, gen_b)):
        edit_draw = rng.random()  # drawn for every prompt so the stream does not depend on drops
        ra, rb = usable_response(a[0]), usable_response(b[0])
        if ra is None or rb is None:
            bad = a[0] if ra is None else b[0]
            counts["empty" if not bad["text"].strip() else "unfinished"] += 1
            continue
        judged = simulated_judgement(it.prompt, ra, rb, edit_draw, thresholds=config.strength_thresholds,
                                     edit_share=config.edit_share)
        if judged is None:
            counts["ties"] += 1
            continue
        chosen, rejected = (ra, rb) if judged.preferred == "a" else (rb, ra)
        row = {
            "id": f"{id_prefix}-{i:04d}",
            "prompt": prompts[i],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "strength": judged.strength,
        }
        if judged.edited is not None:
            row["edited"] = [{"role": "assistant", "content": judged.edited}]
            counts["edited"] += 1
        counts[judged.strength] += 1
        rows.append(row)
    return rows, counts
