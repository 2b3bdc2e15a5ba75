"""Prompts with verifiable instructions that posttrain writes itself (report 4.3.7: "we ... use
verifiable instructions"), for rejection sampling ranked by the instruction reward
(posttrain.reward.instructions) and for an IFEval-style held-out benchmark.

A prompt is a base request written here (short writing tasks, explanations, lists, emails,
advice...) followed by one or two instructions drawn from IFEval's checkers (the
`if-verifiable` package's registry), each with kwargs drawn so its checker accepts them:

    {"id": "train-0007", "prompt": "Write a short note ... Keep the whole reply under 50 words.",
     "instruction_id_list": ["length_constraints:number_words"],
     "kwargs": [{"num_words": 50, "relation": "less than"}]}

Two splits share no base request:
- `train`: the instructions in posttrain's own wordings (two or three per instruction);
- `heldout`: the instructions as the checker itself words them (its `build_description`), which
  is how IFEval's own prompts are written. A model trained on `train` is judged on requests it
  never saw, with instructions phrased in a way it never trained on: training prompts share no
  8-gram with the held-out ones, nor with IFBench's test prompts (posttrain.decontam checks it).

Instructions whose checker needs NLTK data that cannot be installed offline
(`number_sentences`, `capital_word_frequency`) and `response_language` (a 135M model writes
English only) are left out. Two instructions on one prompt never conflict: at most one per
group (letter case, how the reply starts or ends, layout, length, words), and the ones that fix
the whole shape of the reply (JSON, a fixed answer, two responses, repeat the request) come alone.

Everything is drawn from `random.Random(f"{seed}:{split}")`: the same seed gives the same rows.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

SPLITS = ("train", "heldout")

# --------------------------------------------------------------------------- base requests

TRAIN_REQUESTS = (
    "Write a short note to a neighbour asking them to water your plants while you travel.",
    "Explain how a refrigerator keeps food cold.",
    "List some ideas for a rainy weekend at home.",
    "Write an email to a teacher asking for an extension on a history essay.",
    "Describe a walk along a beach at sunset.",
    "Give advice to someone starting their first job in an office.",
    "Explain why people need to sleep.",
    "Write a product description for a reusable water bottle.",
    "Suggest a plan for learning to cook simple meals.",
    "Write a thank-you message to a friend who helped you move house.",
    "Explain what a budget is and why it helps.",
    "Describe your ideal small library in a village.",
    "Write a short story about a lost umbrella that finds its owner.",
    "Explain how bees make honey.",
    "Give tips for keeping a tidy desk.",
    "Write an invitation to a birthday picnic in the park.",
    "Explain the difference between weather and climate.",
    "Describe a busy morning market in a small town.",
    "Write a review of a cafe that serves excellent soup.",
    "Explain why exercise is good for the heart.",
    "Write a letter to a pen pal about your favourite season.",
    "Give reasons to learn a second language.",
    "Explain how a bicycle gear system works.",
    "Write a short speech welcoming new members to a chess club.",
    "Describe the sound of a thunderstorm at night.",
    "Suggest ways to save water at home.",
    "Write an email to a landlord reporting a broken heater.",
    "Explain what photosynthesis does for a plant.",
    "Write a poem about an old wooden bridge.",
    "Give advice for preparing for a job interview.",
    "Explain how a library lends books to its members.",
    "Describe a cat watching birds from a window.",
    "Write a notice for a lost dog found near the school.",
    "Explain why the moon seems to change shape.",
    "Suggest activities for a family trip to the mountains.",
    "Write a message apologising for missing a meeting.",
    "Explain how recycling paper works.",
    "Describe the smell of fresh bread in a bakery.",
    "Write a short biography of an imaginary inventor.",
    "Give tips for studying for a maths exam.",
    "Explain what a volcano is.",
    "Write an advertisement for a bicycle repair shop.",
    "Describe a garden in early spring.",
    "Explain why we should wear sunscreen.",
    "Write a welcome message for guests at a holiday cottage.",
    "Suggest healthy snacks for a long train journey.",
    "Explain how a compass helps people find their way.",
    "Write a diary entry about the first day at a new school.",
    "Give advice to someone who wants to start running.",
    "Explain what happens when water boils.",
    "Write a short fable about a patient turtle.",
    "Describe a quiet evening in a mountain village.",
    "Write an email inviting colleagues to a team lunch.",
    "Explain why forests are important for the planet.",
    "List things to pack for a camping trip.",
    "Write a short review of a board game you enjoy.",
    "Explain how a rainbow forms.",
    "Give tips for writing a clear shopping list.",
    "Describe a crowded railway station during a holiday.",
    "Write a message congratulating a cousin on passing an exam.",
    "Explain what a museum curator does.",
    "Suggest ways to make a small bedroom feel bigger.",
    "Write a short story about a robot that learns to paint.",
    "Explain why leaves change colour in autumn.",
)
"""Base requests of the `train` split."""

HELDOUT_REQUESTS = (
    "Write a note to your manager asking for a day off next Friday.",
    "Explain how an airplane stays in the air.",
    "Describe a snowy street in a northern city.",
    "Give advice to a student who feels nervous before a presentation.",
    "Write an email to a hotel asking whether breakfast is included.",
    "Explain why the ocean is salty.",
    "Write a short story about a fox who opens a bakery.",
    "Suggest ways to spend less time looking at a phone.",
    "Describe an old clock tower in a market square.",
    "Explain how vaccines help the body fight illness.",
    "Write a letter thanking a nurse for their care.",
    "Give tips for growing tomatoes on a balcony.",
    "Explain what an electric circuit is.",
    "Write a post announcing a neighbourhood clean-up day.",
    "Describe a lighthouse during a storm.",
    "Explain why cities are often warmer than the countryside.",
    "Write an apology to a customer whose parcel arrived late.",
    "Suggest a weekly routine for keeping a house clean.",
    "Explain how glass is made.",
    "Write a poem about a train crossing a desert.",
    "Give advice for choosing a good pair of walking shoes.",
    "Describe the first snowfall seen by a child.",
    "Explain what a tide is and what causes it.",
    "Write a short speech for a friend's wedding.",
    "Explain how a camera captures a picture.",
    "Write an email asking a colleague to review a report.",
    "Describe a fishing boat returning to harbour at dawn.",
    "Give reasons why reading fiction is worthwhile.",
    "Explain why bread rises in the oven.",
    "Write a short story about a girl who befriends a giant.",
    "Suggest ideas for a school science fair project.",
    "Explain how earthquakes happen.",
    "Write a message welcoming a new neighbour to the street.",
    "Describe the inside of an old bookshop.",
    "Explain what inflation means for a family's shopping.",
    "Give tips for taking care of a houseplant.",
    "Write a complaint to a bus company about a cancelled service.",
    "Explain why some animals hibernate in winter.",
    "Describe a summer festival in a river town.",
    "Write a short guide to making a cup of tea.",
)
"""Base requests of the `heldout` split (none of them, nor their wording, is in `train`)."""

ORDINARY_QUESTIONS = (
    "What is the capital of France?",
    "Why is the sky blue? Answer briefly.",
    "Give me one tip for sleeping better.",
    "What is 12 times 7?",
    "Write a haiku about autumn rain.",
    "Who wrote the play Romeo and Juliet?",
)
"""Plain questions without instructions: what the model answers outside the task, before and
after training (length, stopping, repetition), to show it did not collapse."""

# --------------------------------------------------------------------------- instructions

KEYWORDS = ("simple", "future", "quiet", "window", "reason", "bright", "story", "garden", "careful", "morning")
AVOIDED = ("very", "really", "good", "also", "because", "important", "just", "thing")
END_PHRASES = {"train": ("Hope this helps.", "That is all.", "Thanks for reading.", "Any other questions?"),
               "heldout": ("Is there anything else I can help with?", "Let me know if you have additional questions.")}
"""An end phrase is quoted whole in the prompt: the held-out ones (IFEval's) would otherwise be
8-grams shared with training prompts."""
LETTERS = "aeinorst"


@dataclass(frozen=True)
class Kind:
    """One instruction of IFEval's registry, as the generator uses it."""

    id: str
    """The checker's id (`if_verifiable.ifeval` registry)."""
    group: str
    """At most one instruction per group on a prompt; `alone`: it comes without another."""
    draw: Callable[[random.Random, str, str], dict]
    """kwargs for the checker, given the random state, the base request and the split."""
    wordings: tuple[str, ...]
    """posttrain's own wordings (`str.format` with the kwargs and `{words}`, the keywords joined)."""


def _none(rng: random.Random, request: str, split: str) -> dict:
    return {}


def _number_words(rng, request, split):
    relation = rng.choice(("less than", "at least"))
    return {"relation": relation, "num_words": rng.choice((40, 60, 80) if relation == "less than" else (20, 30, 50))}


KINDS: tuple[Kind, ...] = (
    Kind("change_case:english_lowercase", "case", _none, (
        "Use only small letters in your reply: not a single capital letter anywhere.",
        "Type the whole answer in lowercase, with no uppercase characters at all.")),
    Kind("change_case:english_capital", "case", _none, (
        "Answer in capital letters only, as if the caps lock key were stuck.",
        "Every letter of your reply must be uppercase.")),
    Kind("punctuation:no_comma", "marks", _none, (
        "Do not put a single comma anywhere in what you write.",
        "Avoid commas completely; use other punctuation instead.")),
    Kind("startend:quotation", "wrap", _none, (
        "Put your complete reply inside one pair of double quotes.",
        "Start your answer with a double quote mark and finish it with another one.")),
    Kind("startend:end_checker", "wrap", lambda rng, r, s: {"end_phrase": rng.choice(END_PHRASES[s])}, (
        "Close your reply with this exact sentence, adding nothing after it: {end_phrase}",
        "The last words of your answer must be exactly: {end_phrase}")),
    Kind("detectable_content:postscript", "wrap",
         lambda rng, r, s: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}, (
        "After the main text, add a final note that begins with {postscript_marker}",
        "Finish with a short afterthought introduced by {postscript_marker}")),
    Kind("detectable_format:title", "marks", _none, (
        "Give your text a title and put it between double angle brackets, for example <<my title>>.",
        "Begin with a heading wrapped like this: <<heading here>>.")),
    Kind("detectable_format:number_bullet_lists", "layout", lambda rng, r, s: {"num_bullets": rng.randint(2, 5)}, (
        "Format the answer as a list of exactly {num_bullets} markdown bullets, each line starting with '* '.",
        "Reply with {num_bullets} bullet points and nothing else, using '* ' at the start of each one.")),
    Kind("detectable_format:number_highlighted_sections", "marks",
         lambda rng, r, s: {"num_highlights": rng.randint(1, 3)}, (
        "Mark at least {num_highlights} phrases in your reply as highlighted with single asterisks, like *this*.",
        "Emphasise {num_highlights} or more parts of the text using markdown italics, for example *key idea*.")),
    Kind("detectable_format:multiple_sections", "layout",
         lambda rng, r, s: {"section_spliter": rng.choice(("Section", "PART")), "num_sections": rng.randint(2, 3)}, (
        "Split the reply into {num_sections} parts, each one opening with the label {section_spliter} and its "
        "number, such as {section_spliter} 1.",
        "Organise your answer in {num_sections} numbered blocks headed {section_spliter} 1, {section_spliter} 2 "
        "and so on.")),
    Kind("length_constraints:number_paragraphs", "layout", lambda rng, r, s: {"num_paragraphs": rng.randint(2, 4)}, (
        "Write exactly {num_paragraphs} paragraphs and put a line with three asterisks (***) between them.",
        "Your text needs {num_paragraphs} paragraphs, separated from one another by the markdown divider ***.")),
    Kind("length_constraints:number_words", "length", _number_words, (
        "Keep the word count of your reply {relation} {num_words}.",
        "Use {relation} {num_words} words in total.")),
    Kind("detectable_content:number_placeholders", "marks", lambda rng, r, s: {"num_placeholders": rng.randint(1, 3)}, (
        "Include at least {num_placeholders} blanks to fill in later, written in square brackets like [name].",
        "Leave {num_placeholders} or more placeholders in square brackets, such as [date], for the reader to "
        "complete.")),
    Kind("keywords:existence", "words", lambda rng, r, s: {"keywords": rng.sample(KEYWORDS, rng.randint(1, 2))}, (
        "Make sure these words appear in your reply: {words}.",
        "Work the following words into the text: {words}.")),
    Kind("keywords:forbidden_words", "words",
         lambda rng, r, s: {"forbidden_words": rng.sample(AVOIDED, rng.randint(1, 2))}, (
        "Never use these words: {words}.",
        "The words {words} must not appear anywhere in what you write.")),
    Kind("keywords:frequency", "words",
         lambda rng, r, s: {"keyword": rng.choice(KEYWORDS), "frequency": rng.randint(2, 3), "relation": "at least"}, (
        "Use the word {keyword} {relation} {frequency} times.",
        "The word {keyword} should come up {relation} {frequency} times in your answer.")),
    Kind("keywords:letter_frequency", "words",
         lambda rng, r, s: {"letter": rng.choice(LETTERS), "let_frequency": rng.randint(3, 8),
                            "let_relation": "at least"}, (
        "The letter {letter} has to occur {let_relation} {let_frequency} times in the reply.",
        "Write something in which the letter {letter} shows up {let_relation} {let_frequency} times.")),
    Kind("detectable_format:json_format", "alone", _none, (
        "Give the whole reply as valid JSON; you may put it in a ``` code block.",
        "Format everything you return as one JSON object.")),
    Kind("detectable_format:constrained_response", "alone", _none, (
        # "or" between the options: the checker's own wording lists them back to back (8-grams)
        "Reply with one of these exact sentences only: My answer is yes. or My answer is no. or My answer is maybe.",
        "Do not explain: just say 'My answer is yes.' or 'My answer is no.' or 'My answer is maybe.'")),
    Kind("combination:two_responses", "alone", _none, (
        "Write two different answers and put a line of six asterisks (******) between them, nothing else.",
        "Offer two separate versions of the reply, divided by ******.")),
    Kind("combination:repeat_prompt", "alone", lambda rng, r, s: {"prompt_to_repeat": r}, (
        "Copy the request above word for word first, then give your answer after it.",
        "Begin by restating the request exactly as written, without changes, and only then respond.")),
)
BY_ID = {k.id: k for k in KINDS}


def _checker_wording(kind: Kind, kwargs: dict) -> str:
    """The instruction as IFEval's checker words it (its build_description), seeded so the
    wording it draws among its own templates is reproducible."""
    from posttrain.reward.instructions import checkers

    cls = checkers().registries["ifeval"][kind.id]
    state = random.getstate()
    try:
        random.seed(repr(sorted(kwargs.items())))
        return cls(kind.id).build_description(**kwargs)
    finally:
        random.setstate(state)


def _own_wording(kind: Kind, kwargs: dict, rng: random.Random) -> str:
    names = kwargs.get("keywords") or kwargs.get("forbidden_words") or []
    return rng.choice(kind.wordings).format(**kwargs, words=", ".join(names))


def _pick(rng: random.Random, count: int, pool: tuple[Kind, ...]) -> list[Kind]:
    first = rng.choice(pool)
    others = [k for k in pool if k.group not in ("alone", first.group)]
    if count == 1 or first.group == "alone" or not others:
        return [first]
    return [first, rng.choice(others)]


def make_prompts(n: int, split: str = "train", seed: int = 0, two_share: float = 0.3,
                 kinds: list[str] | None = None) -> list[dict]:
    """`n` prompt rows of `split` (see the module docstring); `two_share` of them carry two
    instructions, the rest one. The base requests are cycled in a seeded order, so `n` up to
    the split's number of requests uses each at most once. `kinds`: only these instruction
    ids (default: every one in `KINDS`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    unknown = sorted(set(kinds or ()) - set(BY_ID))
    if unknown or kinds == []:
        raise ValueError(f"kinds: {unknown or 'empty'}: not among the generator's instructions "
                         f"({', '.join(BY_ID)})")
    pool = KINDS if kinds is None else tuple(k for k in KINDS if k.id in kinds)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= two_share <= 1:
        raise ValueError(f"two_share must be between 0 and 1, got {two_share}")
    rng = random.Random(f"{seed}:{split}")
    requests = list(TRAIN_REQUESTS if split == "train" else HELDOUT_REQUESTS)
    rows = []
    order: list[str] = []
    for i in range(n):
        if not order:
            order = rng.sample(requests, len(requests))
        request = order.pop()
        ids, kwargs, texts = [], [], []
        for kind in _pick(rng, 2 if rng.random() < two_share else 1, pool):
            kw = kind.draw(rng, request, split)
            ids.append(kind.id)
            kwargs.append(kw)
            texts.append(_own_wording(kind, kw, rng) if split == "train" else _checker_wording(kind, kw))
        row_id = f"{split}-{i:04d}"
        row = {"id": row_id, "prompt": " ".join([request, *texts]), "instruction_id_list": ids, "kwargs": kwargs}
        if split == "heldout":
            row["key"] = row_id  # IFEval's id field: the file is an `ifeval_file` benchmark as it is
        rows.append(row)
    return rows


def ordinary_rows() -> list[dict]:
    """`ORDINARY_QUESTIONS` as prompt rows (no instructions)."""
    return [{"id": f"ordinary-{i}", "prompt": q} for i, q in enumerate(ORDINARY_QUESTIONS)]


def write_prompt_files(out_dir: str | os.PathLike, n_train: int, n_heldout: int, seed: int = 0,
                       train_kinds: list[str] | None = None) -> dict[str, str]:
    """Write `train.jsonl`, `heldout.jsonl` and `ordinary.jsonl` into `out_dir` (atomically);
    returns their paths by name. `train_kinds` restricts the training prompts' instructions."""
    from pathlib import Path

    from posttrain.files import write_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("train", make_prompts(n_train, "train", seed, kinds=train_kinds)),
                       ("heldout", make_prompts(n_heldout, "heldout", seed)),
                       ("ordinary", ordinary_rows())):
        paths[name] = str(out / f"{name}.jsonl")
        write_jsonl(paths[name], rows)
    return paths
