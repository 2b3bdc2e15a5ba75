"""The embedded world: the task scorer, the reward, the deterministic build, the annotation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from posttrain import files
from posttrain.annotate.base import strength_of
from posttrain.world import build
from posttrain.world import task
from posttrain.world.build import (
    STRENGTHS,
    WORLD_VERSION,
    WorldConfig,
    ensure_world,
    evaluate_task,
    resolve_world_path,
)

P = "Sort these numbers: 7 2 9 4"  # reference "2 4 7 9"


# ----------------------------------------------------------------------------- the task

@pytest.mark.parametrize("response, expected", [
    ("2 4 7 9", 1.0),
    ("  2 4 7 9\n", 1.0),           # surrounding whitespace ignored
    ("2 4 9 7", 2 / 4),             # two positions right
    ("2 4 7", 3 / 4),               # one short: 3 hits over max(4, 3)
    ("2 4 7 9 9", 4 / 5),           # one extra: 4 hits over max(4, 5)
    ("2  4 7 9", 0.9),              # every number in place but not written canonically
    ("2\n4 7 9", 0.9),
    ("7 2 9 4", 0.0),               # the input echoed: no position right
    ("hello", 0.0),
    ("", 0.0),
    ("2, 4, 7, 9", 1 / 4),          # "9" is the only word equal to the answer's at its place
])
def test_score_partial_credit_by_hand(response, expected):
    assert task.score(P, response) == pytest.approx(expected)


def test_reference_and_repeats():
    assert task.reference("Sort these numbers: 3 3 1") == "1 3 3"
    assert task.score("Sort these numbers: 3 3 1", "1 3") == pytest.approx(2 / 3)
    assert task.parse_prompt("  Sort these numbers:  5 0 5 ") == [5, 0, 5]


def test_reference_rejects_other_prompts():
    with pytest.raises(ValueError, match="not a sorting-task prompt"):
        task.reference("What is 2 + 2?")
    with pytest.raises(ValueError):
        task.score("Sort these numbers:", "1")


def test_positional_credit_pure():
    assert task.positional_credit(["1", "2"], []) == 0.0
    assert task.positional_credit([], []) == 0.0
    assert task.positional_credit(["1", "2", "3"], ["1", "x", "3", "4"]) == pytest.approx(2 / 4)


def test_items_are_natural_and_disjoint():
    rng = random.Random(0)
    used: set[str] = set()
    a = task.sample_items(50, rng, used)
    b = task.sample_items(50, rng, used)
    assert not {i.prompt for i in a} & {i.prompt for i in b}
    for it in a + b:
        assert task.MIN_LEN <= len(it.numbers) <= task.MAX_LEN
        assert it.prompt.startswith("Sort these numbers: ")
        assert task.reference(it.prompt) == it.answer
        assert task.score(it.prompt, it.answer) == 1.0


def test_task_reward_reads_last_user_message():
    reward = task.TaskReward()
    prompts = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": P}],
        [{"role": "user", "content": "Sort these numbers: 1 0"},  # earlier turn is ignored
         {"role": "assistant", "content": "0 1"},
         {"role": "user", "content": "Sort these numbers: 3 1 2"}],
        [{"role": "user", "content": "Tell me a joke"}],
    ]
    assert reward.score(prompts, ["2 4 9 7", "1 2 3", "no"]) == [0.5, 1.0, None]
    with pytest.raises(ValueError, match="prompt 2"):
        task.TaskReward(strict=True).score(prompts, ["2 4 9 7", "1 2 3", "no"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward.score(prompts[:2], ["x"])


def test_task_reward_loads_by_import_path():
    import importlib

    module, name = "posttrain.world.task:TaskReward".split(":")
    reward = getattr(importlib.import_module(module), name)()
    assert reward.name == "world_task"


@pytest.mark.parametrize("gap, label", [
    (1.0, "significantly_better"), (0.5, "significantly_better"), (0.49, "better"),
    (0.25, "better"), (0.2, "slightly_better"), (0.1, "slightly_better"),
    (0.05, "marginally_better"), (0.0, None),
])
def test_strength_from_gap(gap, label):
    assert strength_of(gap, (0.5, 0.25, 0.1)) == label


def test_resolve_world_path_rejects_bad_specs():
    for spec in ("base_model", "hub:base_model", "world:", "world@x:base_model"):
        with pytest.raises(ValueError):
            resolve_world_path(spec)


# ----------------------------------------------------------------------------- the build

SMALL = WorldConfig(
    n_train_prompts=32, n_heldout_prompts=24, n_sft_seed=8, n_pref_prompts_per_round=32,
    n_heldout_pref_prompts=16, rounds=2, n_transcripts=512, pretrain_steps=40, batch_size=32,
    eval_samples=2,
)
DATA_FILES = ["base_model/model.safetensors", "base_model/tokenizer.json", "sft_seed.jsonl",
              "prompts/train.jsonl", "prompts/heldout.jsonl", "preferences/round_01.jsonl",
              "preferences/round_02.jsonl", "preferences/heldout.jsonl"]


@pytest.fixture(scope="module")
def small_worlds(tmp_path_factory):
    """The small world built twice with seed 0 (separate caches) and once with seed 1."""
    a = ensure_world(tmp_path_factory.mktemp("wa"), seed=0, config=SMALL)
    b = ensure_world(tmp_path_factory.mktemp("wb"), seed=0, config=SMALL)
    c = ensure_world(tmp_path_factory.mktemp("wc"), seed=1, config=SMALL)
    return a, b, c


def _hashes(world) -> dict[str, str]:
    return {name: files.sha256_file(world.root / name) for name in DATA_FILES}


def test_build_is_deterministic_per_seed(small_worlds):
    a, b, c = small_worlds
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert ha == hb
    assert all(ha[k] != hc[k] for k in DATA_FILES if k != "base_model/tokenizer.json")


def test_world_layout_and_cache(small_worlds):
    a = small_worlds[0]
    assert a.root.name == f"0-{WORLD_VERSION}-{SMALL.key()}" and a.root.is_absolute()
    info = a.info()
    assert info["seed"] == 0 and info["sizes"]["train_prompts"] == 32
    assert len(a.preference_rounds) == 2 and a.preferences(2) == a.root / "preferences/round_02.jsonl"
    with pytest.raises(ValueError):
        a.preferences(3)
    # A second call finds the finished world and builds nothing.
    stamp = a.manifest.stat().st_mtime_ns
    assert ensure_world(a.root.parent.parent, seed=0, config=SMALL) == a
    assert a.manifest.stat().st_mtime_ns == stamp
    assert not [p for p in a.root.parent.iterdir() if p.name.endswith(".tmp")]


def test_splits_are_disjoint_and_well_formed(small_worlds):
    w = small_worlds[0]
    train = [r["prompt"][-1]["content"] for r in files.iter_jsonl(w.train_prompts)]
    held = [r["prompt"][-1]["content"] for r in files.iter_jsonl(w.heldout_prompts)]
    for r in files.iter_jsonl(w.train_prompts):
        assert r["reference"] == task.reference(r["prompt"][-1]["content"])
    rounds = [[r["prompt"][-1]["content"] for r in files.iter_jsonl(p)] for p in w.preference_rounds]
    held_pref = [r["prompt"][-1]["content"] for r in files.iter_jsonl(w.heldout_preferences)]
    seed = [r["messages"] for r in files.iter_jsonl(w.sft_seed)]
    groups = [train, held, held_pref, [m[0]["content"] for m in seed], *rounds]
    everything = [p for g in groups for p in g]
    assert len(everything) == len(set(everything)), "a prompt appears in two splits"
    for m in seed:
        assert [x["role"] for x in m] == ["user", "assistant"]
        assert task.score(m[0]["content"], m[1]["content"]) == 1.0


def test_annotation_rows_are_consistent(small_worlds):
    w = small_worlds[0]
    n_rows = 0
    for path in [*w.preference_rounds, w.heldout_preferences]:
        ids = set()
        for row in files.iter_jsonl(path):
            n_rows += 1
            assert row["id"] not in ids
            ids.add(row["id"])
            assert [m["role"] for m in row["prompt"]] == ["user"]
            prompt = row["prompt"][0]["content"]
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
            gap = task.score(prompt, chosen) - task.score(prompt, rejected)
            assert gap > 0  # ties are dropped
            assert row["strength"] in STRENGTHS
            assert row["strength"] == strength_of(gap, SMALL.strength_thresholds)
            if "edited" in row:
                assert task.score(prompt, row["edited"][0]["content"]) == 1.0
                assert task.score(prompt, chosen) < 1.0
    counts = w.info()["sizes"]["preferences"]
    assert n_rows == sum(c["rows"] for c in counts.values())
    assert all(c["rows"] + c["ties"] + c["empty"] + c["unfinished"] == (16 if k == "heldout" else 32)
               for k, c in counts.items())


def test_resolve_world_path_names(small_worlds, monkeypatch):
    import posttrain.world.build as build

    w = small_worlds[0]
    monkeypatch.setattr(build, "ensure_world", lambda cache_dir=None, seed=0: w)
    assert resolve_world_path("world:base_model") == w.base_model
    assert resolve_world_path("world:preferences/round_02.jsonl") == w.preferences(2)
    assert resolve_world_path("world:prompts/train.jsonl") == w.train_prompts
    assert resolve_world_path("world:heldout_prompts") == w.heldout_prompts
    with pytest.raises(FileNotFoundError, match="round_07"):
        resolve_world_path("world:preferences/round_07.jsonl")
    with pytest.raises(ValueError, match="outside"):
        resolve_world_path("world:../x")


def test_evaluate_task_reports_score_and_termination(small_worlds):
    w = small_worlds[0]
    greedy = evaluate_task(w.base_model, w.heldout_prompts, greedy=True)
    assert greedy == evaluate_task(w.base_model, w.heldout_prompts, greedy=True)
    assert greedy["n_responses"] == greedy["n_prompts"] == 24
    sampled = evaluate_task(w.base_model, w.heldout_prompts, n=2, temperature=1.0, limit=8)
    assert sampled["n_responses"] == 16
    for r in (greedy, sampled):
        assert 0.0 <= r["score"] <= 1.0 and 0.0 <= r["eot_rate"] <= 1.0
        assert 1 <= r["mean_length"] <= 24
    # The manifest's greedy number is this same measurement.
    assert w.info()["base_model"]["greedy"]["score"] == pytest.approx(greedy["score"])


@pytest.mark.slow
def test_default_world_base_model_is_between_random_and_perfect():
    """The demo world: the base model follows the format and half-knows the task."""
    w = ensure_world()
    info = w.info()
    base, rand = info["base_model"], info["random_model"]["sampled"]["score"]
    assert rand < 0.05
    for mode in ("sampled", "greedy"):
        assert rand + 0.2 < base[mode]["score"] < 0.95
    assert base["sampled"]["eot_rate"] > 0.9
    for i in range(1, 7):
        assert Path(resolve_world_path(f"world:preferences/round_{i:02d}.jsonl")).exists()


# ----------------------------------------------------------------------------- robustness of the build
# Sampling's floats differ between machines (instruction sets, thread counts), so which
# responses come out empty or unfinished differs too: the annotation must be valid whatever
# the model samples, not only for the samples seen on the machine that wrote the test.


def _annotate_to_file(model, tokenizer, items, seed, path):
    rows, counts = build.annotate(model, tokenizer, items, SMALL, random.Random(seed), seed=seed,
                                  id_prefix=f"s{seed}")
    files.write_jsonl(path, rows)
    return rows, counts


@pytest.mark.parametrize("threads", [1, 2])
def test_annotation_passes_validation_under_seeds_and_threads(small_worlds, tmp_path, threads):
    import torch

    from posttrain import data
    from posttrain.modeling import load_causal_lm, load_tokenizer

    w = small_worlds[0]
    model, tokenizer = load_causal_lm(w.base_model, dtype="float32", device="cpu"), load_tokenizer(w.base_model)
    items = task.sample_items(48, random.Random(7), set())
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dropped = 0
        for seed in (0, 1, 2):
            path = tmp_path / f"prefs_{seed}.jsonl"
            rows, counts = _annotate_to_file(model, tokenizer, items, seed, path)
            report = data.validate_file(path, "preference")
            assert report.ok, data.format_report(report)
            assert report.rows == len(rows) == 48 - counts["ties"] - counts["empty"] - counts["unfinished"]
            dropped += counts["empty"] + counts["unfinished"]
    finally:
        torch.set_num_threads(prev)
    # The small world's barely trained model does leave turns unfinished: the filter is exercised.
    assert dropped > 0


def test_injected_empty_responses_never_reach_a_file(small_worlds, tmp_path, monkeypatch):
    from posttrain import data
    from posttrain.modeling import load_causal_lm, load_tokenizer

    from posttrain.world import rows as world_rows

    real = world_rows.generate_messages

    def sabotaged(*args, **kwargs):
        out = real(*args, **kwargs)
        for i, gens in enumerate(out):
            if i % 3 == 0:
                gens[0] = {**gens[0], "text": " \n ", "finished": True}   # empty after strip
            elif i % 3 == 1:
                gens[0] = {**gens[0], "text": "", "finished": True}
        return out

    monkeypatch.setattr(world_rows, "generate_messages", sabotaged)
    w = small_worlds[0]
    model, tokenizer = load_causal_lm(w.base_model, dtype="float32", device="cpu"), load_tokenizer(w.base_model)
    items = task.sample_items(30, random.Random(3), set())
    rows, counts = _annotate_to_file(model, tokenizer, items, 0, tmp_path / "p.jsonl")
    assert counts["empty"] >= 20  # two prompts in three had an empty response
    for row in rows:
        assert row["chosen"][0]["content"].strip() and row["rejected"][0]["content"].strip()
    assert data.validate_file(tmp_path / "p.jsonl", "preference").ok


def test_a_world_that_fails_validation_is_never_published(tmp_path, monkeypatch):
    real = build.annotate

    def broken(*args, **kwargs):
        rows, counts = real(*args, **kwargs)
        rows.append({**rows[0], "id": "bad", "rejected": [{"role": "assistant", "content": ""}]})
        return rows, counts

    monkeypatch.setattr(build, "annotate", broken)
    with pytest.raises(build.WorldBuildError, match=r"round_01.jsonl.*row \d+.*rejected.*bug in posttrain"):
        ensure_world(tmp_path, seed=0, config=SMALL)
    assert not build.world_dir(tmp_path, 0, SMALL).exists()
