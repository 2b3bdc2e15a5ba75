"""The one loader (posttrain.loader) behind `load_reward` and `load_annotator`: the same steps and
the same messages for both kinds, word for word, with only the kind's noun and method changed."""

from __future__ import annotations

import textwrap

import pytest

from posttrain import loader
from posttrain.annotate.base import ANNOTATOR, AnnotatorError, AnnotatorSpec, load_annotator
from posttrain.reward.base import REWARD, RewardError, RewardSpec, load_reward

PLUGINS = textwrap.dedent('''
    from posttrain.annotate import annotator_factory
    from posttrain.reward import reward_factory

    class Reward:
        def __init__(self, scale=1.0):
            self.scale = scale
        def score(self, prompts, responses):
            return [self.scale] * len(responses)

    class Annotator:
        def __init__(self, scale=1.0):
            self.scale = scale
        def annotate(self, requests):
            return [None] * len(requests)

    class Neither:
        pass

    class Frozen:
        """Has the method but takes no attribute: a name cannot be set on it."""
        __slots__ = ()
        def score(self, prompts, responses):
            return []
        def annotate(self, requests):
            return []

    @reward_factory
    def make_reward(scale):
        return Reward(scale)

    @annotator_factory
    def make_annotator(scale):
        return Annotator(scale)

    @reward_factory
    def reward_builds_nothing():
        return Neither()

    @annotator_factory
    def annotator_builds_nothing():
        return Neither()

    @reward_factory
    def reward_frozen():
        return Frozen()

    @annotator_factory
    def annotator_frozen():
        return Frozen()

    @reward_factory
    def reward_raises(**kwargs):
        raise TypeError("bad scale")

    @annotator_factory
    def annotator_raises(**kwargs):
        raise TypeError("bad scale")

    def unmarked():
        return Reward()
''')

KINDS = {
    "reward": (REWARD, load_reward, RewardError, "Reward", "make_reward"),
    "annotator": (ANNOTATOR, load_annotator, AnnotatorError, "Annotator", "make_annotator"),
}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_plugins"


def _message(fn, error, *args) -> str:
    with pytest.raises(error) as got:
        fn(*args)
    return str(got.value)


def test_the_kinds_are_what_their_modules_say():
    assert (REWARD.noun, REWARD.method, REWARD.error, REWARD.spec, REWARD.article) == (
        "reward", "score", RewardError, RewardSpec, "a")
    assert (ANNOTATOR.noun, ANNOTATOR.method, ANNOTATOR.error, ANNOTATOR.spec, ANNOTATOR.article) == (
        "annotator", "annotate", AnnotatorError, AnnotatorSpec, "an")
    # one mark per kind, the attribute names factories carried before the loader was shared
    assert (REWARD.mark, ANNOTATOR.mark) == ("__posttrain_reward_factory__", "__posttrain_annotator_factory__")


@pytest.mark.parametrize("kind", KINDS)
def test_a_class_and_a_marked_factory_load_with_their_kwargs(plugins, kind):
    _, load, _, cls, factory = KINDS[kind]
    built = load({"target": f"my_plugins:{cls}", "kwargs": {"scale": 2.0}})
    assert type(built).__name__ == cls and built.scale == 2.0
    assert built.name == f"my_plugins:{cls}"  # no name of its own: the target names it
    assert load({"target": f"my_plugins:{factory}", "kwargs": {"scale": 3.0}}).scale == 3.0
    assert load(built) is built  # an object that follows the protocol is returned as it is


@pytest.mark.parametrize("kind", KINDS)
def test_every_refusal_names_the_kind_and_the_target(plugins, kind):
    k, load, error, cls, _ = KINDS[kind]
    noun, a, sig = k.noun, k.article, k.signature
    assert _message(load, error, "x") == (
        f"{noun} 'x': name {a} {noun} as {{'target': 'package.module:Name', 'kwargs': {{...}}}} "
        f"(or pass {a} {noun} object)")
    assert _message(load, error, object()) == f"'object' is not {a} {noun}: it has no {sig} method"
    assert _message(load, error, {"target": "my_plugins:Neither"}) == (
        f"{noun} target 'my_plugins:Neither': class Neither has no {sig} method, so it is not {a} {noun} "
        "(nothing was called)")
    assert _message(load, error, {"target": "my_plugins:unmarked"}) == (
        f"{noun} target 'my_plugins:unmarked' is a function, not {a} {noun} class or a function marked "
        f"{k.decorator} (nothing was called)")
    assert _message(load, error, {"target": f"my_plugins:{cls}", "kwargs": {"bogus": 1}}) == (
        f"{noun}.kwargs.bogus: not an argument of my_plugins:{cls} (it takes: scale)")
    assert _message(load, error, {"target": f"my_plugins:{noun}_builds_nothing"}) == (
        f"{noun} target 'my_plugins:{noun}_builds_nothing' built a Neither, which has no {sig} method")
    assert _message(load, error, {"target": f"my_plugins:{noun}_raises", "kwargs": {"scale": 1}}) == (
        f"{noun} target 'my_plugins:{noun}_raises' rejected kwargs ['scale']: bad scale")
    # an annotator that cannot take a name was an AttributeError before the loader was shared
    assert _message(load, error, {"target": f"my_plugins:{noun}_frozen"}) == (
        f"{noun} target 'my_plugins:{noun}_frozen': its object has no `name` and none can be set")
    assert _message(load, error, {"target": "no_such_module_here:X"}).startswith(
        f"{noun} target 'no_such_module_here:X': cannot import module 'no_such_module_here'")
    assert _message(load, error, {"target": "my_plugins:Missing"}) == (
        f"{noun} target 'my_plugins:Missing': module 'my_plugins' has no attribute 'Missing'")


def test_a_factory_of_one_kind_is_not_a_factory_of_the_other(plugins):
    with pytest.raises(AnnotatorError, match="is a function, not an annotator class"):
        load_annotator({"target": "my_plugins:make_reward", "kwargs": {"scale": 1}})
    with pytest.raises(RewardError, match="is a function, not a reward class"):
        load_reward({"target": "my_plugins:make_annotator", "kwargs": {"scale": 1}})


def test_the_decorators_mark_functions_only():
    from posttrain.annotate import annotator_factory
    from posttrain.reward import reward_factory

    for decorator, noun in ((reward_factory, "reward"), (annotator_factory, "annotator")):
        with pytest.raises(TypeError, match=rf"^@{noun}_factory marks functions, got int$"):
            decorator(3)


def test_kwargs_are_checked_against_the_signature_without_a_call():
    calls = []

    def target(path, /, scale=1.0, *, device="cpu"):
        calls.append(1)

    with pytest.raises(ValueError) as got:
        loader.check_kwargs(target, {"colour": 1}, "m:target", "x.kwargs", ValueError)
    assert str(got.value) == ("x.kwargs.colour: not an argument of m:target (it takes: scale, device); "
                              "x.kwargs: m:target needs 'path', which the kwargs do not give (it takes: scale, device)")
    loader.check_kwargs(lambda **kw: None, {"anything": 1}, "m:f", "x.kwargs", ValueError)  # **kwargs takes all
    assert calls == []
