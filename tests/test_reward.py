"""The reward API: loading by import path, abstention, loud failures, combinations, the RM reward."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from posttrain import reward as R

PROMPTS = [[{"role": "user", "content": "sort 3 1 2"}], [{"role": "user", "content": "sort 5 4"}],
           [{"role": "user", "content": "hello"}]]
RESPONSES = ["1 2 3", "5 4", "hi there"]

CUSTOM = textwrap.dedent('''
    import math
    from posttrain.reward import reward_factory

    class WordCount:
        """Scores a response by its number of words; abstains on empty responses."""

        def __init__(self, scale=1.0):
            self.scale = scale
            self.name = "word_count"
            self.ready = False

        def setup(self):
            self.ready = True

        def teardown(self):
            self.ready = False

        def score(self, prompts, responses):
            return [self.scale * len(r.split()) if r.strip() else None for r in responses]

    class Nameless:
        def score(self, prompts, responses):
            return [0.0] * len(responses)

    @reward_factory
    def make(kind, value=None):
        class Broken:
            name = "broken_" + kind
            def score(self, prompts, responses):
                if kind == "short":
                    return [1.0] * (len(responses) - 1)
                if kind == "nan":
                    return [1.0, math.nan] + [0.0] * (len(responses) - 2)
                if kind == "inf":
                    return [math.inf] * len(responses)
                if kind == "string":
                    return ["1.0"] * len(responses)
                if kind == "raises":
                    raise KeyError("no reference answer")
                if kind == "scalar":
                    return 1.0
        return Broken()

    class Recorded:
        """Counts its constructions: checking a spec must never build it."""
        built = 0

        def __init__(self, path, /, scale=1.0, *, device="cpu"):
            Recorded.built += 1

        def score(self, prompts, responses):
            return [0.0] * len(responses)

    @reward_factory
    def anything(**kwargs):
        return WordCount(scale=len(kwargs))

    NOT_CALLABLE = 3

    def unmarked(kind):
        return make(kind)
''')


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


# ----------------------------------------------------------------------------- loading


def test_load_reward_by_import_path(custom_module):
    r = R.load_reward({"target": "my_rewards:WordCount", "kwargs": {"scale": 2.0}})
    assert r.name == "word_count" and r.scale == 2.0
    assert R.checked_score(r, PROMPTS, RESPONSES) == [6.0, 4.0, 4.0]
    spec = R.RewardSpec(target="my_rewards:WordCount")
    assert R.load_reward(spec).scale == 1.0
    nameless = R.load_reward({"target": "my_rewards:Nameless"})
    assert nameless.name == "my_rewards:Nameless"  # errors and records need a name


def test_load_reward_passes_instances_through(custom_module):
    import my_rewards

    inst = my_rewards.WordCount()
    assert R.load_reward(inst) is inst
    with pytest.raises(R.RewardError, match="not a reward"):
        R.load_reward(object())
    with pytest.raises(R.RewardError, match="name a reward as"):
        R.load_reward("my_rewards:WordCount")


def test_load_reward_errors_name_the_target(custom_module):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):  # a file path is not an import path
        R.load_reward({"target": "/tmp/my_rewards.py:WordCount"})
    with pytest.raises(ValidationError):  # unknown keys are errors
        R.load_reward({"target": "my_rewards:WordCount", "kwarg": {}})
    with pytest.raises(R.RewardError, match="cannot import module 'no_such_module'"):
        R.load_reward({"target": "no_such_module:X"})
    with pytest.raises(R.RewardError, match="has no attribute 'Missing'"):
        R.load_reward({"target": "my_rewards:Missing"})
    with pytest.raises(R.RewardError, match=r"^reward\.kwargs\.bogus: not an argument of my_rewards:WordCount "
                                            r"\(it takes: scale\)$"):
        R.load_reward({"target": "my_rewards:WordCount", "kwargs": {"bogus": 1}})
    with pytest.raises(R.RewardError, match="is a int, not a reward class"):
        R.load_reward({"target": "my_rewards:NOT_CALLABLE"})


@pytest.mark.parametrize("target,kwargs", [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:run", {"args": "touch {marker}", "shell": True}),
    ("subprocess:Popen", {"args": ["touch", "{marker}"]}),
    ("builtins:exec", {"source": "open({marker!r}, 'w')"}),
    ("my_rewards:unmarked", {"kind": "short"}),
    ("pathlib:Path", {}),
])
def test_a_recipe_cannot_call_what_is_not_a_reward(custom_module, tmp_path, target, kwargs):
    """Issue 15: `os:system` and `subprocess:run` ran before the reward check. The target is
    checked first (a class with `score`, or a @reward_factory function) and nothing is called."""
    marker = tmp_path / "called"
    kwargs = {k: v.format(marker=str(marker)) if isinstance(v, str) else
              [x.format(marker=str(marker)) for x in v] if isinstance(v, list) else v for k, v in kwargs.items()}
    with pytest.raises(R.RewardError, match="not a reward") as info:
        R.load_reward({"target": target, "kwargs": kwargs})
    assert "nothing was called" in str(info.value)
    assert not marker.exists()
    with pytest.raises(R.RewardError, match=r"^reward\.target: "):
        R.check_reward_spec({"target": target, "kwargs": kwargs}, "reward")
    assert not marker.exists()


def test_nested_specs_are_checked_before_anything_is_built(custom_module, tmp_path):
    marker = tmp_path / "called"
    spec = {"target": "posttrain.reward:WeightedReward", "kwargs": {"components": [
        [{"target": "my_rewards:WordCount"}, 1.0], [{"target": "os:system", "kwargs": {"command": f"touch {marker}"}}, 1.0]]}}
    with pytest.raises(R.RewardError, match=r"^eval\.checker\.kwargs\.components\[1\]\[0\]\.target: .*os:system"):
        R.check_reward_spec(spec, "eval.checker")
    with pytest.raises(R.RewardError, match="not a reward"):
        R.load_reward(spec)
    assert not marker.exists()
    R.check_reward_spec({"target": "my_rewards:make", "kwargs": {"kind": "nan"}}, "reward")  # marked: fine
    with pytest.raises(TypeError, match="marks functions"):
        R.reward_factory(print)


MATH = "posttrain.reward.math:MathAnswerReward"


def test_a_misspelled_kwarg_is_an_error_naming_the_recipe_key_built_ins_included(custom_module):
    """Issue 24: validate accepted `{no_such_kwarg: 1}` on a built-in reward."""
    with pytest.raises(R.RewardError) as info:
        R.check_reward_spec({"target": MATH, "kwargs": {"no_such_kwarg": 1}}, "reward")
    assert str(info.value) == (f"reward.kwargs.no_such_kwarg: not an argument of {MATH} "
                               "(it takes: prompts_file, rel_tol, abs_tol)")
    with pytest.raises(R.RewardError, match=r"^eval\.checker\.kwargs\.rel_tl: not an argument"):
        R.check_reward_spec({"target": MATH, "kwargs": {"rel_tl": 0.1}}, "eval.checker")
    with pytest.raises(R.RewardError, match=r"^reward\.kwargs\.componets: not an argument of "
                                            r"posttrain\.reward:WeightedReward .*; reward\.kwargs: "
                                            r"posttrain\.reward:WeightedReward needs 'components'"):
        R.check_reward_spec({"target": "posttrain.reward:WeightedReward", "kwargs": {"componets": []}}, "reward")
    with pytest.raises(R.RewardError, match=r"^reward\.kwargs: posttrain\.reward:RMReward needs 'path'"):
        R.check_reward_spec({"target": "posttrain.reward:RMReward"}, "reward")
    R.check_reward_spec({"target": MATH, "kwargs": {"rel_tol": 0.0, "prompts_file": "p.jsonl"}}, "reward")  # fine


def test_kwargs_are_checked_against_the_signature_without_building_anything(custom_module):
    import my_rewards

    with pytest.raises(R.RewardError, match=r"^reward\.kwargs: my_rewards:Recorded needs 'path'"):
        R.check_reward_spec({"target": "my_rewards:Recorded", "kwargs": {"scale": 2}}, "reward")
    with pytest.raises(R.RewardError, match=r"needs 'path'"):  # positional-only: no key can give it
        R.check_reward_spec({"target": "my_rewards:Recorded", "kwargs": {"path": "x"}}, "reward")
    with pytest.raises(R.RewardError, match=r"^reward\.kwargs\.devcie: not an argument of my_rewards:Recorded "
                                            r"\(it takes: scale, device\)"):
        R.load_reward({"target": "my_rewards:Recorded", "kwargs": {"devcie": "cpu"}})
    assert my_rewards.Recorded.built == 0
    R.check_reward_spec({"target": "my_rewards:anything", "kwargs": {"whatever": 1, "at": "all"}}, "reward")
    assert R.load_reward({"target": "my_rewards:anything", "kwargs": {"a": 1, "b": 2}}).scale == 2  # **kwargs


def test_nested_specs_kwargs_are_checked_and_rm_placeholders_stay_valid(custom_module):
    components = [[{"target": MATH, "kwargs": {"prompts_file": "p.jsonl"}}, 1.0], ["@rm", 0.01]]
    R.check_reward_spec({"target": "posttrain.reward:WeightedReward", "kwargs": {"components": components}}, "reward")
    components[0][0]["kwargs"]["tolerance"] = 0.1
    spec = {"target": "posttrain.reward:WeightedReward", "kwargs": {"components": [
        [{"target": "posttrain.reward:WeightedReward", "kwargs": {"components": components}}, 1.0]]}}
    with pytest.raises(R.RewardError) as info:
        R.check_reward_spec(spec, "reward")
    assert str(info.value).startswith("reward.kwargs.components[0][0].kwargs.components[0][0].kwargs.tolerance: "
                                      f"not an argument of {MATH}")
    with pytest.raises(R.RewardError, match=r"tolerance: not an argument"):
        R.load_reward(spec)
    with pytest.raises(R.RewardError, match=r"^reward\.kwargs\.components\[0\]\[0\]\.kwargs: expected a mapping"):
        R.check_reward_spec({"target": "posttrain.reward:WeightedReward",
                             "kwargs": {"components": [[{"target": MATH, "kwargs": [1]}, 1.0]]}}, "reward")


def test_setup_and_teardown_through_active(custom_module):
    r = R.load_reward({"target": "my_rewards:WordCount"})
    with R.active(r):
        assert r.ready
    assert not r.ready
    with pytest.raises(ZeroDivisionError), R.active(r):
        assert r.ready
        1 / 0
    assert not r.ready  # torn down even when the block fails


# ----------------------------------------------------------------------------- checked scoring


def test_abstention_is_returned_as_none(custom_module):
    r = R.load_reward({"target": "my_rewards:WordCount"})
    assert R.checked_score(r, PROMPTS, ["a b", "   ", "c"]) == [2.0, None, 1.0]
    assert R.checked_score(r, [], []) == []


@pytest.mark.parametrize("kind,message", [
    ("short", "reward 'broken_short' returned 2 scores for 3 samples"),
    ("nan", "reward 'broken_nan' returned nan for sample 1"),
    ("inf", "reward 'broken_inf' returned inf for sample 0"),
    ("string", "reward 'broken_string' returned a non-number for sample 0: '1.0'"),
    ("raises", "reward 'broken_raises' raised KeyError: 'no reference answer'"),
    ("scalar", "reward 'broken_scalar' returned float, expected a list of 3 floats or None"),
])
def test_each_failure_mode_fails_loudly_naming_the_reward(custom_module, kind, message):
    r = R.load_reward({"target": "my_rewards:make", "kwargs": {"kind": kind}})
    with pytest.raises(R.RewardError) as info:
        R.checked_score(r, PROMPTS, RESPONSES)
    assert str(info.value) == message
    if kind == "raises":
        assert isinstance(info.value.__cause__, KeyError)  # the original traceback stays chained


def test_numpy_and_torch_scores_are_accepted():
    class T:
        name = "tensor"

        def score(self, prompts, responses):
            return torch.tensor([0.5, 1.5, -2.0])

    class L:
        name = "scalars"

        def score(self, prompts, responses):
            return [torch.tensor(1.0), 2, None]

    assert R.checked_score(T(), PROMPTS, RESPONSES) == [0.5, 1.5, -2.0]
    assert R.checked_score(L(), PROMPTS, RESPONSES) == [1.0, 2.0, None]
    with pytest.raises(R.RewardError, match="non-number for sample 0: True"):
        R.check_scores("b", [True], 1)


def test_setup_failure_names_the_reward():
    class Bad:
        name = "sandbox"

        def setup(self):
            raise OSError("docker not running")

        def score(self, prompts, responses):
            return []

    with pytest.raises(R.RewardError, match=r"reward 'sandbox' failed in setup\(\): OSError: docker not running"):
        R.setup(Bad())


# ----------------------------------------------------------------------------- combinations


class Fixed:
    def __init__(self, name, values):
        self.name, self.values = name, values
        self.events = []

    def setup(self):
        self.events.append("setup")

    def teardown(self):
        self.events.append("teardown")

    def score(self, prompts, responses):
        return list(self.values)


def test_combine_scores_by_hand():
    a = [1.0, None, None, 2.0]
    b = [0.5, 0.5, None, None]
    w = [1.0, 0.1]
    assert R.combine_scores([a, b], w, "skip") == pytest.approx([1.05, 0.05, None, 2.0])
    assert R.combine_scores([a, b], w, "zero") == pytest.approx([1.05, 0.05, 0.0, 2.0])
    assert R.combine_scores([a, b], w, "all") == [pytest.approx(1.05), None, None, None]
    with pytest.raises(ValueError, match="abstain must be"):
        R.combine_scores([a], [1.0], "ignore")


def test_checker_plus_rm_tie_break():
    checker = Fixed("checker", [1.0, 1.0, 0.0])   # two responses pass the checker
    rm_like = Fixed("rm", [-3.0, 2.0, 9.0])        # the RM prefers the failing one most
    combo = R.WeightedReward([(checker, 1.0), (rm_like, 0.01)])
    scores = R.checked_score(combo, PROMPTS, RESPONSES)
    assert scores == pytest.approx([0.97, 1.02, 0.09])
    # The checker decides; among those that pass it, the RM breaks the tie.
    assert max(range(3), key=lambda i: scores[i]) == 1
    assert combo.name == "weighted(1*checker + 0.01*rm)"
    with R.active(combo):
        pass
    assert checker.events == ["setup", "teardown"] and rm_like.events == ["setup", "teardown"]


def test_weighted_reward_from_specs_and_component_errors(custom_module):
    combo = R.load_reward({"target": "posttrain.reward:WeightedReward",
                           "kwargs": {"components": [[{"target": "my_rewards:WordCount"}, 1.0],
                                                     [{"target": "my_rewards:Nameless"}, 2.0]],
                                      "abstain": "all"}})
    assert R.checked_score(combo, PROMPTS, ["a b", "", "c"]) == [2.0, None, 1.0]
    broken = R.WeightedReward([(Fixed("ok", [1.0, 1.0, 1.0]), 1.0),
                               (R.load_reward({"target": "my_rewards:make", "kwargs": {"kind": "nan"}}), 1.0)])
    with pytest.raises(R.RewardError, match="reward 'broken_nan' returned nan"):
        R.checked_score(broken, PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="expected \\(reward, weight\\)"):
        R.WeightedReward([Fixed("x", [])])
    with pytest.raises(ValueError, match="at least one"):
        R.WeightedReward([])


# ----------------------------------------------------------------------------- the trained RM


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    from posttrain.modeling import save_checkpoint
    from posttrain.stages.rm import load_reward_model

    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    out = tmp_path_factory.mktemp("rm") / "model"
    save_checkpoint(model, tiny_tokenizer, out)
    return out


def test_rm_reward_scores_equal_a_plain_forward(rm_dir, tiny_tokenizer):
    from posttrain import chat
    from posttrain.stages.rm import load_reward_model

    r = R.RMReward(rm_dir, batch_size=2, device="cpu", dtype="float32")
    got = R.checked_score(r, PROMPTS, RESPONSES)
    model = load_reward_model(rm_dir).eval()
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([chat.encode_example(tiny_tokenizer, p, x).input_ids])).logits.item()
                for p, x in zip(PROMPTS, RESPONSES)]
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(g, 3) for g in got)) == 3
    # The batch size changes padding, not scores.
    assert R.checked_score(R.RMReward(rm_dir, batch_size=1, device="cpu", dtype="float32"),
                           PROMPTS, RESPONSES) == pytest.approx(got, abs=1e-4)
    r.teardown()
    assert r.model is None


def test_rm_reward_abstains_on_too_long_samples(rm_dir):
    r = R.RMReward(rm_dir, device="cpu", dtype="float32", max_length=40)
    with R.active(r):
        scores = R.checked_score(r, PROMPTS, ["1 2 3", "word " * 50, "hi"])
    assert scores[1] is None and all(math.isfinite(s) for s in (scores[0], scores[2]))
    assert r.abstained == 1
    with pytest.raises(FileNotFoundError, match="no model folder"):
        R.RMReward(rm_dir.parent / "missing").setup()


def test_rm_reward_dtype_is_honoured(rm_dir):
    r = R.RMReward(rm_dir, device="cpu", dtype="bfloat16")
    r.setup()
    assert next(r.model.parameters()).dtype == torch.bfloat16
    f32 = R.checked_score(R.RMReward(rm_dir, device="cpu", dtype="float32"), PROMPTS, RESPONSES)
    assert R.checked_score(r, PROMPTS, RESPONSES) == pytest.approx(f32, abs=0.1 * max(map(abs, f32)) + 0.05)


class _NeedsReference:
    """Scores 1.0 when the response equals the row's reference answer; abstains without one."""

    name = "needs_reference"

    def score(self, prompts, responses):
        raise AssertionError("score() must not be called when metas are given")

    def score_with_meta(self, prompts, responses, metas):
        return [None if "answer" not in m else float(r == m["answer"]) for r, m in zip(responses, metas)]


class _Const:
    name = "const"

    def score(self, prompts, responses):
        return [0.5] * len(responses)


def test_metas_reach_rewards_that_use_them_also_inside_a_combination():
    from posttrain.reward import WeightedReward, checked_score

    prompts = [[{"role": "user", "content": "2+2?"}]] * 3
    metas = [{"answer": "4"}, {"answer": "5"}, {}]
    assert checked_score(_NeedsReference(), prompts, ["4", "4", "4"], metas) == [1.0, 0.0, None]
    combo = WeightedReward([(_NeedsReference(), 1.0), (_Const(), 0.1)])
    assert checked_score(combo, prompts, ["4", "4", "4"], metas) == pytest.approx([1.05, 0.05, 0.05])
    with pytest.raises(ValueError, match="3 prompts but 3 responses and 2 metas"):
        checked_score(combo, prompts, ["4", "4", "4"], metas[:2])


def test_fingerprint_follows_the_weights_not_the_folder(tiny_model_dir, tmp_path):
    import shutil

    from posttrain.reward import RMReward, WeightedReward, reward_fingerprint

    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model_dir, copy)
    a, b = RMReward(tiny_model_dir), RMReward(copy)
    assert a.name != b.name  # names say where, for error messages
    assert reward_fingerprint(a) == reward_fingerprint(b)
    combo_a = WeightedReward([(_Const(), 1.0), (a, 0.01)])
    combo_b = WeightedReward([(_Const(), 1.0), (b, 0.01)])
    assert reward_fingerprint(combo_a) == reward_fingerprint(combo_b)
    assert reward_fingerprint(combo_a) != reward_fingerprint(WeightedReward([(_Const(), 1.0), (a, 0.02)]))
    assert reward_fingerprint(_Const()) == "const"  # no fingerprint(): the name


# ----------------------------------------------------------------------------- reasons, isolation


def test_one_sample_that_raises_is_that_samples_zero_with_a_reason(caplog):
    class Picky:
        name = "picky"

        def score(self, prompts, responses):
            if any(r == "boom" for r in responses):
                raise ValueError("cannot read " + next(r for r in responses if r == "boom"))
            return [R.Scored(1.0, "correct", "42 == 42") if r == "ok" else 0.5 for r in responses]

    verdicts = R.checked_verdicts(Picky(), PROMPTS, ["ok", "boom", "half"])
    assert verdicts == [R.Scored(1.0, "correct", "42 == 42"),
                        R.Scored(0.0, "reward_error", "ValueError: cannot read boom"),
                        R.Scored(0.5, "scored", "")]
    assert "reward 'picky' raised on sample 1" in caplog.text   # its traceback is in the log
    assert R.checked_score(Picky(), PROMPTS, ["ok", "boom", "half"]) == [1.0, 0.0, 0.5]
    with pytest.raises(R.RewardError, match="reward 'picky' raised ValueError: cannot read boom"):
        R.checked_verdicts(Picky(), PROMPTS[:2], ["boom", "boom"])   # every sample raises: the reward's fault


def test_an_infrastructure_fault_fails_the_batch():
    class NoSandbox:
        name = "sandboxed"

        def score(self, prompts, responses):
            raise R.RewardInfraError("reward 'sandboxed': the sandbox cannot start")

    with pytest.raises(R.RewardInfraError, match="cannot start"):
        R.checked_verdicts(NoSandbox(), PROMPTS, RESPONSES)


def test_scored_values_are_checked_and_reasons_combine():
    class Told:
        def __init__(self, name, verdicts):
            self.name, self.verdicts = name, verdicts

        def score(self, prompts, responses):
            return self.verdicts

    with pytest.raises(R.RewardError, match="returned nan for sample 0"):
        R.checked_verdicts(Told("t", [R.Scored(float("nan"), "x")]), PROMPTS[:1], ["a"])
    with pytest.raises(R.RewardError, match="without a reason"):
        R.checked_verdicts(Told("t", [R.Scored(1.0, "")]), PROMPTS[:1], ["a"])
    checker = Told("checker", [R.Scored(1.0, "correct", "4 == 4"), R.Scored(None, "no_reference")])
    plain = Told("rm", [0.5, 0.25])
    both = R.WeightedReward([(checker, 1.0), (plain, 0.1)])
    assert R.checked_verdicts(both, PROMPTS[:2], ["a", "b"]) == [
        R.Scored(1.05, "correct", "4 == 4"), R.Scored(0.025, "no_reference", "")]
