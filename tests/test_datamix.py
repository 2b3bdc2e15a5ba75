"""The long-context data-mix rules (Llama 3 report 4.3.4), checked against hand counts."""

from __future__ import annotations

import pytest

from posttrain.datamix import drop_long_examples, long_cap, long_share_of, mix_long_examples


@pytest.mark.parametrize("n_short, n_long, share, expected", [
    (999, 5, 0.001, 1),     # 1 / (999 + 1) = 0.001 exactly: allowed
    (998, 5, 0.001, 0),     # 1 / 999 > 0.001
    (1998, 5, 0.001, 2),    # 2 / 2000 = 0.001
    (1997, 5, 0.001, 1),    # 2 / 1999 > 0.001, 1 / 1998 < 0.001
    (9, 5, 0.1, 1),         # 1 / 10
    (8, 5, 0.2, 2),         # 2 / 10
    (3, 5, 0.5, 3),         # 3 / 6; 4 / 7 > 0.5
    (3, 2, 0.5, 2),         # capped by the long examples there are
    (0, 4, 0.001, 0),       # no short data: a long example would be 100% of the mix
    (10, 4, 0.0, 0),
    (0, 4, 1.0, 4),
])
def test_long_cap_by_hand(n_short, n_long, share, expected):
    assert long_cap(n_short, n_long, share) == expected


def test_long_cap_rejects_bad_share():
    with pytest.raises(ValueError, match="long_share"):
        long_cap(10, 1, 1.5)
    with pytest.raises(ValueError, match="long_share"):
        long_cap(10, 1, float("nan"))


def test_sft_mix_keeps_all_short_and_the_capped_share_of_long():
    # 18 short (length 10) and 6 long (length 500) examples, threshold 100, share 10%:
    # cap = floor(0.1 * 18 / 0.9) = 2, so 20 kept, 4 dropped, and 2/20 = 10% of the mix is long.
    examples = [f"s{i}" for i in range(18)] + [f"L{i}" for i in range(6)]
    lengths = [10] * 18 + [500] * 6
    kept, counts = mix_long_examples(examples, lengths, long_threshold_tokens=100, long_share=0.1, seed=3)
    assert len(kept) == 20
    assert [e for e in kept if e.startswith("s")] == [f"s{i}" for i in range(18)]
    long_kept = [e for e in kept if e.startswith("L")]
    assert len(long_kept) == 2
    # The output keeps the input order.
    assert kept == [e for e in examples if e in set(kept)]
    assert counts.summary() == {"name": "sft long-context mix", "total": 24, "kept": 20, "dropped": 4,
                                "dropped_by_reason": {"long_over_share": 4}}
    kept_lengths = [lengths[examples.index(e)] for e in kept]
    assert long_share_of(kept_lengths, 100) == pytest.approx(0.1)


def test_sft_mix_is_seeded():
    examples = list(range(200))
    lengths = [2000 if i % 4 == 0 else 5 for i in examples]  # 50 long, 150 short
    # share 2%: cap = floor(0.02 * 150 / 0.98) = floor(3.06) = 3
    a, _ = mix_long_examples(examples, lengths, long_threshold_tokens=1000, long_share=0.02, seed=7)
    b, _ = mix_long_examples(examples, lengths, long_threshold_tokens=1000, long_share=0.02, seed=7)
    picks = {s: tuple(e for e in mix_long_examples(examples, lengths, long_threshold_tokens=1000,
                                                   long_share=0.02, seed=s)[0] if e % 4 == 0)
             for s in range(6)}
    assert a == b
    assert all(len(p) == 3 for p in picks.values())
    assert len(set(picks.values())) > 1  # another seed picks other long examples


def test_sft_mix_default_share_is_the_papers_tenth_of_a_percent():
    examples = list(range(1004))
    lengths = [5] * 999 + [9000] * 5
    kept, counts = mix_long_examples(examples, lengths, long_threshold_tokens=8192, seed=0)
    assert len(kept) == 1000 and counts.dropped == {"long_over_share": 4}


def test_threshold_is_strict():
    kept, counts = mix_long_examples(["a", "b"], [100, 101], long_threshold_tokens=100, long_share=0.0, seed=0)
    assert kept == ["a"] and counts.kept == 1


def test_dpo_drops_every_long_example():
    examples = ["a", "b", "c", "d", "e"]
    kept, counts = drop_long_examples(examples, [3, 900, 64, 65, 1], long_threshold_tokens=64)
    assert kept == ["a", "c", "e"]
    assert counts.summary()["dropped_by_reason"] == {"long_in_dpo": 2}
    assert counts.total == 5


def test_nothing_long_means_nothing_dropped():
    kept, counts = drop_long_examples(["a"], [3], long_threshold_tokens=64)
    assert kept == ["a"] and counts.summary()["dropped"] == 0


def test_bad_lengths_are_named():
    with pytest.raises(ValueError, match="2 examples but 1 lengths"):
        mix_long_examples(["a", "b"], [3], long_threshold_tokens=10, seed=0)
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        drop_long_examples(["a", "b"], [3, -1], long_threshold_tokens=10)
