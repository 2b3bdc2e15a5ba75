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

This module finds, locks, builds and checks a world; the build's parts live beside it:
`config` (WorldConfig, World), `pretrain` (noisy transcripts, the base model's training),
`rows` (seed SFT rows, simulated preference batches), `evaluate` (the task score of a model).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain import files
from posttrain.data import STRENGTHS  # re-exported: tests and users import it from here
from posttrain.world import task
from posttrain.world.config import OPT_IN_FIELDS, WORLD_VERSION, World, WorldConfig
from posttrain.world.evaluate import evaluate_model, evaluate_task, read_prompts, render_prompts, summarize_scores
from posttrain.world.pretrain import corrupt_answer, encode_transcripts, noisy_answer, pretrain, tokenizer_corpus
from posttrain.world.rows import NOISY_ANSWERS, annotate, seed_sft_rows, usable_response

__all__ = [
    "NOISY_ANSWERS", "OPT_IN_FIELDS", "STRENGTHS", "WORLD_NAMES", "WORLD_VERSION", "World", "WorldBuildError",
    "WorldConfig", "annotate", "build_world", "cache_root", "corrupt_answer", "encode_transcripts",
    "ensure_world", "evaluate_model", "evaluate_task", "noisy_answer", "pretrain", "read_prompts",
    "rebuild_world", "render_prompts", "resolve_world_path", "seed_sft_rows", "summarize_scores",
    "tokenizer_corpus", "usable_response", "validate_world_files", "world_dir", "world_error_hint",
]


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


# ---------------------------------------------------------------------------------------
# The build, step by step


@dataclass
class _Splits:
    """The task items of every file, disjoint from each other."""

    heldout: list[task.TaskItem]
    heldout_pref: list[task.TaskItem]
    train: list[task.TaskItem]
    sft_seed: list[task.TaskItem]
    pref_rounds: list[list[task.TaskItem]]


def _rng_streams(seed: int):
    def rng_for(name: str) -> random.Random:
        # One stream per purpose, so resizing one split leaves the others unchanged. A str
        # seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return random.Random(f"posttrain-world-{seed}-{name}")

    return rng_for


def _sample_splits(config: WorldConfig, rng_for) -> _Splits:
    # One shared exclusion set keeps every split disjoint from the others.
    used: set[str] = set()
    heldout = task.sample_items(config.n_heldout_prompts, rng_for("heldout"), used)
    heldout_pref = task.sample_items(config.n_heldout_pref_prompts, rng_for("heldout_pref"), used)
    train = task.sample_items(config.n_train_prompts, rng_for("train"), used)
    sft_seed = task.sample_items(config.n_sft_seed, rng_for("sft_seed"), used)
    pref_rounds = [task.sample_items(config.n_pref_prompts_per_round, rng_for(f"round{r}"), used)
                   for r in range(1, config.rounds + 1)]
    return _Splits(heldout, heldout_pref, train, sft_seed, pref_rounds)


def _transcripts(splits: _Splits, config: WorldConfig, t_rng: random.Random) -> list[tuple[list[dict], str]]:
    """Pre-training transcripts: they may repeat each other and overlap training prompts (it is
    the base model's "web data"), but never a held-out prompt."""
    held = {it.prompt for it in splits.heldout + splits.heldout_pref}
    transcripts = []
    while len(transcripts) < config.n_transcripts:
        it = task.random_item(t_rng)
        if it.prompt in held:
            continue
        answer = noisy_answer(list(it.numbers), t_rng, config)
        transcripts.append((it.messages(), " ".join(map(str, answer))))
    return transcripts


def _train_base_model(tokenizer, transcripts, splits: _Splits, config: WorldConfig, seed: int,
                      timings: dict[str, float]):
    """(model, scores, pre-training losses): a random tiny Llama, measured, pre-trained, measured again."""
    from posttrain.world.tiny import make_tiny_model

    model = make_tiny_model(tokenizer, seed=seed, hidden_size=config.hidden_size,
                            num_layers=config.num_layers, num_heads=config.num_heads,
                            num_kv_heads=config.num_kv_heads, max_position_embeddings=512)
    eval_prompts = [it.messages() for it in splits.heldout]
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
    scores = {"random": random_score, "sampled": base_sampled, "greedy": base_greedy}
    return model, scores, losses


def _annotate_batches(model, tokenizer, splits: _Splits, config: WorldConfig, rng_for, seed: int,
                      pref_dir: Path) -> dict[str, dict]:
    """One simulated preference batch per round and the held-out batch, written; their counts."""
    annotation_counts = {}
    for r, items in enumerate(splits.pref_rounds, start=1):
        rows, counts = annotate(model, tokenizer, items, config, rng_for(f"annotate{r}"),
                                seed=seed * 1000 + r, id_prefix=f"round{r:02d}")
        files.write_jsonl(pref_dir / f"round_{r:02d}.jsonl", rows)
        annotation_counts[f"round_{r:02d}"] = {"rows": len(rows), **counts}
    rows, counts = annotate(model, tokenizer, splits.heldout_pref, config, rng_for("annotate_heldout"),
                            seed=seed * 1000 + 999, id_prefix="heldout")
    files.write_jsonl(pref_dir / "heldout.jsonl", rows)
    annotation_counts["heldout"] = {"rows": len(rows), **counts}
    return annotation_counts


def _save_base_model(model, tokenizer, folder: Path) -> None:
    from transformers.utils import logging as hf_logging

    from posttrain.modeling import save_checkpoint

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for one tiny shard is noise on the terminal
    try:
        save_checkpoint(model, tokenizer, folder)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _write_prompts_and_seed(out: Path, splits: _Splits, config: WorldConfig, rng_for) -> None:
    def prompt_row(split: str, i: int, it: task.TaskItem) -> dict:
        return {"id": f"{split}-{i:04d}", "prompt": it.messages(), "reference": it.answer}

    files.write_jsonl(out / "prompts" / "train.jsonl",
                      [prompt_row("train", i, it) for i, it in enumerate(splits.train)])
    files.write_jsonl(out / "prompts" / "heldout.jsonl",
                      [prompt_row("heldout", i, it) for i, it in enumerate(splits.heldout)])
    files.write_jsonl(out / "sft_seed.jsonl", seed_sft_rows(splits.sft_seed, config, rng_for("sft_noise")))


def _build_world(out: Path, seed: int, config: WorldConfig) -> dict:
    import torch

    from posttrain.world.tiny import build_tokenizer

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rng_for = _rng_streams(seed)
    splits = _sample_splits(config, rng_for)
    transcripts = _transcripts(splits, config, rng_for("transcripts"))
    tokenizer = build_tokenizer(tokenizer_corpus(rng_for("tokenizer")), vocab_size=config.vocab_size)
    timings["data"] = time.perf_counter() - t0

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, scores, losses = _train_base_model(tokenizer, transcripts, splits, config, seed, timings)
        t1 = time.perf_counter()
        annotation_counts = _annotate_batches(model, tokenizer, splits, config, rng_for, seed, out / "preferences")
        timings["annotate"] = time.perf_counter() - t1

    _save_base_model(model, tokenizer, out / "base_model")
    _write_prompts_and_seed(out, splits, config, rng_for)
    validated = validate_world_files(World.at(out, config.rounds))
    timings["total"] = time.perf_counter() - t0
    manifest = {
        "seed": seed,
        "version": WORLD_VERSION,
        "task": "sort the numbers of the last user message ascending (posttrain.world.task)",
        "config": config.manifest_config(),
        "sizes": {
            "train_prompts": len(splits.train), "heldout_prompts": len(splits.heldout),
            "sft_seed": len(splits.sft_seed), "transcripts": len(transcripts),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer), "preferences": annotation_counts,
        },
        "base_model": {"sampled": scores["sampled"], "greedy": scores["greedy"], "pretrain_loss": losses},
        "random_model": {"sampled": scores["random"]},
        "validated_rows": validated,
        "build_seconds": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    files.atomic_write_json(out / "world.json", manifest)
    return manifest
