"""Build the embedded world once, deterministically from a seed, and cache it.

    world = ensure_world(seed=0)          # ~/.cache/posttrain/world/0-<version>/
    world.base_model                      # a tiny Llama checkpoint that half-knows the task

Layout of a world folder (names usable in recipes as `world:<name>`, see resolve_world_path):

    base_model/                 tiny Llama (safetensors + tokenizer + generation config),
                                pre-trained on chat transcripts of the task with noisy answers
    sft_seed.jsonl              correct demonstrations, `messages` rows
    prompts/train.jsonl         prompts for rejection sampling (`id`, `prompt`, `reference`)
    prompts/heldout.jsonl       held-out prompts for evaluation, disjoint from every other file
    preferences/round_01.jsonl  simulated annotation, one batch per round (TRL conversational
    ...                         preference rows + `strength`, sometimes `edited`)
    preferences/round_06.jsonl
    preferences/heldout.jsonl   held-out preference rows (reward-model accuracy)
    world.json                  manifest: seed, version, config, sizes, measured scores;
                                written last, so its presence means the world is complete

The base model is taught the chat format and the task from transcripts whose answers are
corrupted with some probability, so it ends its turns with <|eot_id|> but answers right only
part of the time: the headroom the post-training loop has to close.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain import files
from posttrain.engines import generate_messages
from posttrain.data import STRENGTHS
from posttrain.world import task
from posttrain.world.annotator import simulated_judgement

WORLD_VERSION = "4"
"""Bump when anything that changes a built world changes (task, config defaults, build code)."""



@dataclass(frozen=True)
class WorldConfig:
    """Everything a world build depends on besides the seed. Defaults make the demo world."""

    # Data sizes.
    n_train_prompts: int = 512
    n_heldout_prompts: int = 128
    n_sft_seed: int = 64
    n_pref_prompts_per_round: int = 192
    """Prompts annotated per round; ties are dropped, so a batch has somewhat fewer rows."""
    n_heldout_pref_prompts: int = 128
    rounds: int = 6

    # Simulated annotation.
    annotation_temperatures: tuple[float, float] = (0.7, 1.3)
    """The two sampling setups whose responses annotators compare."""
    edit_share: float = 0.3
    """Share of rows (whose chosen answer is not already right) that get an `edited` answer."""
    strength_thresholds: tuple[float, float, float] = (0.5, 0.25, 0.1)
    """Score gaps at or above which a pair is significantly_better, better, slightly_better;
    any smaller positive gap is marginally_better; a zero gap (tie) is dropped."""

    # Tokenizer and model.
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1

    # Pre-training on noisy transcripts.
    n_transcripts: int = 8192
    echo_share: float = 0.35
    """Share of transcripts whose answer just repeats the list unsorted: a systematic failure
    that competes with sorting even under greedy decoding."""
    corrupt_share: float = 0.35
    """Share of transcripts whose sorted answer has 1 to 3 random edits."""
    pretrain_steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30

    # Measuring the base model (recorded in world.json).
    eval_temperature: float = 1.0
    eval_samples: int = 4
    max_new_tokens: int = 24

    # Opt-in noise that gives data curation (posttrain.stages.curate) something real to clean. Off
    # in the default world, whose files (and world.json) stay byte for byte what they were.
    sft_noisy_share: float = 0.0
    """Share of seed SFT rows whose writer wrapped the right answer in an apology, exclamation
    marks or emojis ("I'm sorry! 2 4 7 9 😊😊"): what report 4.2.3's rule-based cleaning
    removes. The task's checker gives such an answer no credit, so training on it hurts."""
    sft_duplicate_share: float = 0.0
    """Share of extra seed SFT rows that repeat an earlier seed row with the numbers of its
    prompt shuffled: near-duplicate dialogs for semantic dedup."""

    def manifest_config(self) -> dict[str, Any]:
        """The config as world.json records it: the opt-in fields only when they are on, so a
        default world's manifest is the same as before they existed."""
        d = asdict(self)
        for name in OPT_IN_FIELDS:
            if d[name] == 0:
                del d[name]
        return d

    def key(self) -> str:
        """'' for the default config, else a short hash: part of the cache folder's name."""
        if self == WorldConfig():
            return ""
        return hashlib.sha256(json.dumps(self.manifest_config(), sort_keys=True).encode()).hexdigest()[:10]


OPT_IN_FIELDS = ("sft_noisy_share", "sft_duplicate_share")


@dataclass(frozen=True)
class World:
    """Absolute paths of a built world."""

    root: Path
    base_model: Path
    sft_seed: Path
    train_prompts: Path
    heldout_prompts: Path
    preference_rounds: tuple[Path, ...]
    heldout_preferences: Path
    manifest: Path

    @classmethod
    def at(cls, root: str | os.PathLike, rounds: int) -> World:
        root = Path(root).resolve()
        return cls(
            root=root,
            base_model=root / "base_model",
            sft_seed=root / "sft_seed.jsonl",
            train_prompts=root / "prompts" / "train.jsonl",
            heldout_prompts=root / "prompts" / "heldout.jsonl",
            preference_rounds=tuple(root / "preferences" / f"round_{r:02d}.jsonl"
                                    for r in range(1, rounds + 1)),
            heldout_preferences=root / "preferences" / "heldout.jsonl",
            manifest=root / "world.json",
        )

    def preferences(self, round: int) -> Path:
        """The preference batch annotated in `round` (1-based)."""
        if not 1 <= round <= len(self.preference_rounds):
            raise ValueError(f"this world has preference batches for rounds 1..{len(self.preference_rounds)}, "
                             f"not {round}")
        return self.preference_rounds[round - 1]

    def info(self) -> dict[str, Any]:
        return files.read_json(self.manifest)


# ---------------------------------------------------------------------------------------
# Cache location and the public entry points


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("POSTTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "posttrain")
    return Path(root)


def world_dir(cache_dir: str | os.PathLike | None = None, seed: int = 0,
              config: WorldConfig | None = None) -> Path:
    config = config or WorldConfig()
    name = f"{seed}-{WORLD_VERSION}" + (f"-{config.key()}" if config.key() else "")
    return cache_root(cache_dir) / "world" / name


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock beside the world folder, so two processes do not build it twice."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_world(cache_dir: str | os.PathLike | None = None, seed: int = 0,
                 config: WorldConfig | None = None) -> World:
    """The world for `seed`, built on first use under `<cache>/world/<seed>-<version>`.

    `cache_dir` defaults to $POSTTRAIN_CACHE (else ~/.cache/posttrain). The folder appears
    atomically and holds world.json only once complete; a half-built world is never used.
    """
    config = config or WorldConfig()
    root = world_dir(cache_dir, seed, config)
    world = World.at(root, config.rounds)
    if world.manifest.exists():
        return world
    with _build_lock(root):
        if not world.manifest.exists():  # another process may have built it meanwhile
            print(f"posttrain: building the embedded world (seed {seed}) in {root}: about a minute, "
                  f"once per machine", file=sys.stderr, flush=True)
            with files.atomic_dir(root) as tmp:
                build_world(tmp, seed=seed, config=config)
    return world


def rebuild_world(cache_dir: str | os.PathLike | None = None, seed: int = 0,
                  config: WorldConfig | None = None) -> World:
    """Delete the cached world for `seed` (if any) and build it again."""
    config = config or WorldConfig()
    root = world_dir(cache_dir, seed, config)
    with _build_lock(root):
        if root.exists():
            trash = root.with_name(f".{root.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            root.rename(trash)  # the manifest leaves with it at once: no half-deleted world is used
            shutil.rmtree(trash)
    return ensure_world(cache_dir, seed, config)


def world_error_hint(message: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """For an error that names a file of a cached world: who wrote it and what to do."""
    worlds = cache_root(cache_dir) / "world"
    for prefix in {str(worlds), str(worlds.resolve())}:
        m = re.search(re.escape(prefix) + r"/(\d+)-", message)
        if m:
            seed = m.group(1)
            flag = "" if seed == "0" else f" --seed {seed}"
            return (f"That file was generated by posttrain's embedded world (in {worlds}), not written by you: "
                    f"this is a posttrain bug, please report it. Rebuilding the world may get past it: "
                    f"`posttrain world --rebuild{flag}`, then run the same command again.")
    return None


WORLD_NAMES = ("root", "base_model", "sft_seed", "train_prompts", "heldout_prompts",
               "heldout_preferences", "manifest")
"""World fields a recipe may name directly (`world:train_prompts`)."""


def resolve_world_path(spec: str, *, cache_dir: str | os.PathLike | None = None,
                       seed: int = 0) -> Path:
    """Resolve a recipe value `world:<name>` to an absolute path, building the world if needed.

    `<name>` is one of the World fields (`base_model`, `sft_seed`, `train_prompts`,
    `heldout_prompts`, `heldout_preferences`, `manifest`, `root`), or a path inside the world
    folder: `base_model`, `sft_seed.jsonl`, `prompts/train.jsonl`, `prompts/heldout.jsonl`,
    `preferences/round_01.jsonl` ... `preferences/round_06.jsonl`,
    `preferences/heldout.jsonl`, `world.json`. A seed other than 0 is written
    `world@<seed>:<name>`.
    """
    head, sep, name = spec.partition(":")
    if not sep or not (head == "world" or head.startswith("world@")):
        raise ValueError(f"{spec!r} is not a world path (expected 'world:<name>' or 'world@<seed>:<name>')")
    if head.startswith("world@"):
        try:
            seed = int(head[len("world@"):])
        except ValueError:
            raise ValueError(f"{spec!r}: the seed after 'world@' must be an integer") from None
    name = name.strip().strip("/")
    if not name:
        raise ValueError(f"{spec!r}: nothing named after 'world:'")
    world = ensure_world(cache_dir, seed=seed)
    if name in WORLD_NAMES:
        return getattr(world, name)
    path = (world.root / name).resolve()
    if world.root not in path.parents and path != world.root:
        raise ValueError(f"{spec!r} points outside the world folder {world.root}")
    if not path.exists():
        known = sorted(p.relative_to(world.root).as_posix() for p in world.root.rglob("*")
                       if p.suffix == ".jsonl") + ["base_model", "world.json"]
        raise FileNotFoundError(f"{spec!r}: no {name} in the world at {world.root}; known: {known}")
    return path


# ---------------------------------------------------------------------------------------
# Generation and evaluation (plain transformers, batched, left-padded)


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


# ---------------------------------------------------------------------------------------
# Pieces of the build


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


class WorldBuildError(RuntimeError):
    """A world file failed posttrain's own validation: a bug in the builder, not user data."""


def validate_world_files(world: World) -> dict[str, int]:
    """Check every data file of a (possibly still temporary) world folder with the same
    loaders the stages use; returns the row count per file. Raises WorldBuildError naming
    the file and row, so a bad world fails at build time, never later inside a stage."""
    from posttrain import data

    checks = [(p, "preference") for p in (*world.preference_rounds, world.heldout_preferences)]
    checks += [(world.sft_seed, "sft"), (world.train_prompts, "prompts"), (world.heldout_prompts, "prompts")]
    counts = {}
    for path, kind in checks:
        report = data.validate_file(path, kind)
        if not report.ok or report.rows == 0:
            problems = "; ".join(str(p) for p in report.problems[:5]) or "no rows"
            raise WorldBuildError(f"the embedded world's {path.relative_to(world.root)} failed posttrain's "
                                  f"own {kind} validation ({problems}). This is a bug in posttrain's world "
                                  f"builder, not in your data; please report it.")
        counts[path.relative_to(world.root).as_posix()] = report.rows
    return counts


def build_world(out_dir: str | os.PathLike, *, seed: int = 0, config: WorldConfig | None = None) -> dict:
    """Build every file of a world into `out_dir` (world.json last). Returns the manifest.

    Runs on one CPU thread whatever the caller set: the model's matrices are too small to
    gain from more (and on a loaded machine two threads that wait on each other are several
    times slower than one), and a fixed thread count keeps the floating-point reductions,
    hence the files, the same on every machine for a given seed.
    """
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_world(Path(out_dir), seed, config or WorldConfig())
    finally:
        torch.set_num_threads(prev)


def _build_world(out: Path, seed: int, config: WorldConfig) -> dict:
    import torch

    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def rng_for(name: str) -> random.Random:
        # One stream per purpose, so resizing one split leaves the others unchanged. A str
        # seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return random.Random(f"posttrain-world-{seed}-{name}")

    # Prompts: one shared exclusion set keeps every split disjoint from the others.
    used: set[str] = set()
    heldout = task.sample_items(config.n_heldout_prompts, rng_for("heldout"), used)
    heldout_pref = task.sample_items(config.n_heldout_pref_prompts, rng_for("heldout_pref"), used)
    train = task.sample_items(config.n_train_prompts, rng_for("train"), used)
    sft_seed = task.sample_items(config.n_sft_seed, rng_for("sft_seed"), used)
    pref_rounds = [task.sample_items(config.n_pref_prompts_per_round, rng_for(f"round{r}"), used)
                   for r in range(1, config.rounds + 1)]
    # Pre-training transcripts may repeat each other and overlap training prompts (it is the
    # base model's "web data"), but never a held-out prompt.
    held = {it.prompt for it in heldout + heldout_pref}
    t_rng = rng_for("transcripts")
    transcripts = []
    while len(transcripts) < config.n_transcripts:
        it = task.random_item(t_rng)
        if it.prompt in held:
            continue
        answer = noisy_answer(list(it.numbers), t_rng, config)
        transcripts.append((it.messages(), " ".join(map(str, answer))))

    tokenizer = build_tokenizer(tokenizer_corpus(rng_for("tokenizer")), vocab_size=config.vocab_size)
    timings["data"] = time.perf_counter() - t0

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make_tiny_model(tokenizer, seed=seed, hidden_size=config.hidden_size,
                                num_layers=config.num_layers, num_heads=config.num_heads,
                                num_kv_heads=config.num_kv_heads, max_position_embeddings=512)
        eval_prompts = [it.messages() for it in heldout]
        random_score = evaluate_model(model, tokenizer, eval_prompts, n=1,
                                      temperature=config.eval_temperature,
                                      max_new_tokens=config.max_new_tokens, seed=seed)
        t1 = time.perf_counter()
        ids, labels = encode_transcripts(tokenizer, transcripts, max_len=48)
        losses = pretrain(model, ids, labels, config, seed)
        timings["pretrain"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        base_sampled = evaluate_model(model, tokenizer, eval_prompts, n=config.eval_samples,
                                      temperature=config.eval_temperature,
                                      max_new_tokens=config.max_new_tokens, seed=seed)
        base_greedy = evaluate_model(model, tokenizer, eval_prompts, greedy=True,
                                     max_new_tokens=config.max_new_tokens, seed=seed)
        timings["evaluate"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        annotation_counts = {}
        pref_dir = out / "preferences"
        for r, items in enumerate(pref_rounds, start=1):
            rows, counts = annotate(model, tokenizer, items, config, rng_for(f"annotate{r}"),
                                    seed=seed * 1000 + r, id_prefix=f"round{r:02d}")
            files.write_jsonl(pref_dir / f"round_{r:02d}.jsonl", rows)
            annotation_counts[f"round_{r:02d}"] = {"rows": len(rows), **counts}
        rows, counts = annotate(model, tokenizer, heldout_pref, config, rng_for("annotate_heldout"),
                                seed=seed * 1000 + 999, id_prefix="heldout")
        files.write_jsonl(pref_dir / "heldout.jsonl", rows)
        annotation_counts["heldout"] = {"rows": len(rows), **counts}
        timings["annotate"] = time.perf_counter() - t1

    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for one tiny shard is noise on the terminal
    try:
        save_checkpoint(model, tokenizer, out / "base_model")
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()

    def prompt_row(split: str, i: int, it: task.TaskItem) -> dict:
        return {"id": f"{split}-{i:04d}", "prompt": it.messages(), "reference": it.answer}

    files.write_jsonl(out / "prompts" / "train.jsonl", [prompt_row("train", i, it) for i, it in enumerate(train)])
    files.write_jsonl(out / "prompts" / "heldout.jsonl",
                      [prompt_row("heldout", i, it) for i, it in enumerate(heldout)])
    files.write_jsonl(out / "sft_seed.jsonl", seed_sft_rows(sft_seed, config, rng_for("sft_noise")))

    validated = validate_world_files(World.at(out, config.rounds))
    timings["total"] = time.perf_counter() - t0
    manifest = {
        "seed": seed,
        "version": WORLD_VERSION,
        "task": "sort the numbers of the last user message ascending (posttrain.world.task)",
        "config": config.manifest_config(),
        "sizes": {
            "train_prompts": len(train), "heldout_prompts": len(heldout), "sft_seed": len(sft_seed),
            "transcripts": len(transcripts), "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer), "preferences": annotation_counts,
        },
        "base_model": {"sampled": base_sampled, "greedy": base_greedy, "pretrain_loss": losses},
        "random_model": {"sampled": random_score},
        "validated_rows": validated,
        "build_seconds": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    files.atomic_write_json(out / "world.json", manifest)
    return manifest
