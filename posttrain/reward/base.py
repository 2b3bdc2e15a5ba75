"""The reward protocol, loading a reward by import path, and checked scoring.

A reward is anything with a `name` and a `score(prompts, responses)` method:

    prompts:   list[list[message]]   B prompt conversations ({"role", "content"} dicts)
    responses: list[str]             B assistant responses, one per prompt
    returns:   list[float | None | Scored]   B scores; None means "this reward abstains on that
               sample"; a `Scored(value, reason, detail)` says why (tests passed or failed, a
               timeout, an unparseable answer), and that reason is kept with the sample

`setup()` and `teardown()` are optional: callers use `active(reward)` (a context manager)
around a batch of work so a reward that holds a model loads it once and frees it afterwards.

Callers never call `reward.score` directly: `checked_verdicts` (or `checked_score`, its
values alone) validates the answer and fails loudly, naming the reward, on a wrong length, a
NaN/inf or a non-number. An exception raised inside the reward is one sample's failure when it
can be: the batch is scored again one sample at a time, and a sample that still raises scores
0.0 with reason "reward_error" (its traceback in the log), while the others keep their scores.
Only when every sample raises, or the reward raises `RewardInfraError` (its sandbox or server
cannot start), does the call raise (chained, so the traceback stays visible). What abstention
means is the caller's decision (skip the sample, count it as zero, ...), never the reward's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import Field

from posttrain import loader
from posttrain.loader import PluginKind, plugin_name
from posttrain.schema import StrictModel

log = logging.getLogger(__name__)

Message = dict[str, Any]


@runtime_checkable
class Reward(Protocol):
    """What posttrain calls a reward. `setup`/`teardown` are optional (see module docstring)."""

    name: str

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]: ...


class RewardError(RuntimeError):
    """A reward broke its contract or raised; the message names the reward."""


class RewardInfraError(RewardError):
    """The reward cannot score anything (its sandbox, model or server cannot start): never one
    sample's fault, so it fails the batch instead of scoring samples 0."""


@dataclass(frozen=True)
class Scored:
    """A score with the reason for it, as a reward may return it in place of a bare float.

    value:  the score, or None (abstain).
    reason: a short category that the report counts per round, e.g. "passed", "failed",
            "error", "timeout", "crash", "correct", "wrong", "unparseable", "abstain".
    detail: what a person auditing the verdict reads ("3/5 tests passed; test 2: got 4"),
            at most DETAIL_CHARS characters once checked.
    """

    value: float | None
    reason: str
    detail: str = ""


DETAIL_CHARS = 300
PLAIN_REASON = "scored"     # a reward that returned a bare float
ABSTAIN_REASON = "abstain"  # a reward that returned None
ERROR_REASON = "reward_error"


class RewardSpec(StrictModel):
    """A reward named in a recipe: an import path and keyword arguments, never a file to execute."""

    target: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    """Import path `package.module:Name`; Name is a reward class (one with a `score` method)
    or a function marked `@reward_factory`, called with `kwargs`. Anything else is refused
    before it is called."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the class or factory."""


REWARD: PluginKind[Reward] = PluginKind(
    noun="reward", method="score", signature="score(prompts, responses)", error=RewardError, spec=RewardSpec,
    decorator="@posttrain.reward.reward_factory")
"""Rewards for the one loader (posttrain.loader)."""


def reward_name(reward: Any) -> str:
    """The name to put in error messages: the reward's `name`, else its class name."""
    return plugin_name(reward)


def import_target(target: str, what: str = "reward", error: type[Exception] = RewardError) -> Any:
    """The object an import path `package.module:Name` names, imported (never called).
    Failures raise `error`, naming `what` (reward, annotator) and the target."""
    return loader.import_target(target, what, error)


def check_kwargs(target_obj: Any, kwargs: dict[str, Any], target: str, where: str,
                 error: type[Exception] = RewardError) -> None:
    """`posttrain.loader.check_kwargs`: do `kwargs` fit the signature of `target_obj`? Raises
    `error` naming the recipe key `where` and what the target takes."""
    loader.check_kwargs(target_obj, kwargs, target, where, error)


def reward_factory(fn):
    """Mark a function as a reward factory, so that a recipe's `target` may name it:

        @reward_factory
        def make_reward(kind: str) -> Reward: ...

    Without the mark a recipe can name only reward classes: `load_reward` refuses any other
    callable (`os:system`, `subprocess:run`) before calling it."""
    return loader.mark_factory(REWARD, fn)


def resolve_reward_target(target: str) -> Any:
    """The reward class or marked factory `target` names: imported and checked, never called.

    A class must have a `score` method (the reward protocol); a function must carry the
    `@reward_factory` mark. Raises RewardError otherwise."""
    return loader.resolve_target(REWARD, target)


def nested_reward_specs(kwargs: Any, where: str) -> list[tuple[str, dict]]:
    """(key path, spec) of every reward spec (a dict of `target` and `kwargs`) inside a
    reward's kwargs (e.g. the components of a WeightedReward), so they can be checked
    before anything is built. Specs inside nested specs are found too."""
    found: list[tuple[str, dict]] = []
    stack: list[tuple[str, Any, int]] = [(where, kwargs, 0)]
    while stack:
        path, value, depth = stack.pop()
        if depth > 32:
            raise RewardError(f"{path}: nested deeper than 32 levels")
        if isinstance(value, dict):
            if isinstance(value.get("target"), str) and set(value) <= {"target", "kwargs"}:
                found.append((path, value))
            stack.extend((f"{path}.{k}", v, depth + 1) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))
    return sorted(found, key=lambda item: item[0])


def _check_spec(path: str, spec: dict) -> None:
    """One spec (`path` is its key path): an import path naming a reward, and kwargs that fit it."""
    target, kwargs = spec["target"], spec.get("kwargs", {})
    try:
        RewardSpec(target=target)
    except ValueError as e:  # pydantic: not an import path
        raise RewardError(f"{path}.target: {target!r} is not an import path 'package.module:Name'") from e
    if not isinstance(kwargs, dict):
        raise RewardError(f"{path}.kwargs: expected a mapping of argument names to values, got {type(kwargs).__name__}")
    try:
        target_obj = resolve_reward_target(target)
    except RewardError as e:
        raise RewardError(f"{path}.target: {e}") from None
    check_kwargs(target_obj, kwargs, target, f"{path}.kwargs")


def check_nested_reward_specs(kwargs: Any, where: str) -> None:
    """`check_reward_spec` for every reward spec inside `kwargs` (`where`: their key path)."""
    for path, spec in nested_reward_specs(kwargs, where):
        _check_spec(path, spec)


def check_reward_spec(spec: RewardSpec | dict, where: str) -> None:
    """Check a recipe's reward spec and every spec nested in its kwargs without calling
    anything: each target imports and is a reward (`resolve_reward_target`), and its kwargs
    fit its signature (`check_kwargs`). Raises RewardError naming the recipe key (`where`,
    e.g. "eval.checker"); a "@rm" placeholder is a value like any other, so it passes."""
    spec = (spec if isinstance(spec, RewardSpec) else RewardSpec.model_validate(spec)).model_dump()
    _check_spec(where, spec)
    check_nested_reward_specs(spec["kwargs"], f"{where}.kwargs")


def reward_fingerprint(reward: Any) -> str:
    """What identifies a reward's scores across runs: its `fingerprint()` when it has one (a
    reward model hashes its weights, so a moved run folder is the same reward), else its name."""
    fp = getattr(reward, "fingerprint", None)
    return str(fp()) if callable(fp) else reward_name(reward)


def load_reward(spec: RewardSpec | dict | Any) -> Reward:
    """A ready reward object from a recipe spec (`{"target": "pkg.mod:Name", "kwargs": {...}}`),
    a `RewardSpec`, or an object that already follows the protocol (returned as is).

    The target is imported (a module on the Python path), never executed from a file path,
    and must be a reward class or a `@reward_factory` function (`resolve_reward_target`):
    that is checked before it is called (`posttrain.loader.load`, the annotators' loader too).
    """
    return loader.load(REWARD, spec)


def check_verdicts(name: str, scores: Any, n: int) -> list[Scored]:
    """Validate a reward's answer for a batch of `n` samples: one `Scored` per sample."""
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence) and not hasattr(scores, "tolist"):
        raise RewardError(f"reward {name!r} returned {type(scores).__name__}, expected a list of {n} floats or None")
    if hasattr(scores, "tolist") and not isinstance(scores, Sequence):
        scores = scores.tolist()  # numpy array / torch tensor
    if len(scores) != n:
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {n} samples")
    out: list[Scored] = []
    for i, s in enumerate(scores):
        reason, detail = None, ""
        if isinstance(s, Scored):
            if not isinstance(s.reason, str) or not s.reason or not isinstance(s.detail, str):
                raise RewardError(f"reward {name!r} returned a Scored without a reason string for sample {i}")
            reason, detail, s = s.reason[:64], s.detail[:DETAIL_CHARS], s.value
        if s is None:
            out.append(Scored(None, reason or ABSTAIN_REASON, detail))
            continue
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            if hasattr(s, "item") and getattr(s, "ndim", 1) == 0:
                s = s.item()  # numpy / torch scalar
            if isinstance(s, bool) or not isinstance(s, numbers.Real):
                raise RewardError(f"reward {name!r} returned a non-number for sample {i}: {s!r}")
        f = float(s)
        if not math.isfinite(f):
            raise RewardError(f"reward {name!r} returned {f} for sample {i}")
        out.append(Scored(f, reason or PLAIN_REASON, detail))
    return out


def check_scores(name: str, scores: Any, n: int) -> list[float | None]:
    """Validate a reward's answer for a batch of `n` samples; returns plain floats / None."""
    return [v.value for v in check_verdicts(name, scores, n)]


def _call_score(reward: Any, prompts: list[list[Message]], responses: list[str], metas: list[dict] | None) -> Any:
    with_meta = getattr(reward, "score_with_meta", None)
    if metas is not None and callable(with_meta):
        return with_meta(prompts, responses, metas)
    return reward.score(prompts, responses)


def _raised(name: str, e: Exception) -> RewardError:
    err = RewardError(f"reward {name!r} raised {type(e).__name__}: {e}")
    err.__cause__ = e
    return err


def checked_verdicts(reward: Reward, prompts: list[list[Message]], responses: list[str],
                     metas: list[dict] | None = None) -> list[Scored]:
    """`reward.score(prompts, responses)`, validated: one `Scored` (value, reason, detail) per sample.

    With `metas` (one dict per sample: the prompt row's other fields, such as unit tests or a
    reference answer) a reward that has `score_with_meta(prompts, responses, metas)` gets them.
    A broken contract raises RewardError naming the reward. An exception inside the reward is
    isolated to the samples that cause it (see the module docstring).
    """
    name = reward_name(reward)
    if len(prompts) != len(responses) or (metas is not None and len(metas) != len(prompts)):
        raise ValueError(f"checked_score({name!r}): {len(prompts)} prompts but {len(responses)} responses"
                         + ("" if metas is None else f" and {len(metas)} metas"))
    if not prompts:
        return []
    try:
        return check_verdicts(name, _call_score(reward, prompts, responses, metas), len(prompts))
    except RewardError:
        raise
    except Exception as batch_error:  # whose fault? score the samples one at a time to find out
        if len(prompts) == 1:
            raise _raised(name, batch_error) from batch_error
        first = batch_error
    out: list[Scored] = []
    failed = 0
    for i in range(len(prompts)):
        try:
            out += check_verdicts(name, _call_score(reward, prompts[i:i + 1], responses[i:i + 1],
                                                    None if metas is None else metas[i:i + 1]), 1)
        except RewardError:
            raise
        except Exception as e:
            failed += 1
            log.warning("reward %r raised on sample %d; it scores 0.0 (reason %r)", name, i, ERROR_REASON,
                        exc_info=e)
            out.append(Scored(0.0, ERROR_REASON, f"{type(e).__name__}: {e}"[:DETAIL_CHARS]))
    if failed == len(prompts):
        raise _raised(name, first) from first
    return out


def checked_score(reward: Reward, prompts: list[list[Message]], responses: list[str],
                  metas: list[dict] | None = None) -> list[float | None]:
    """`checked_verdicts`, the values alone: a float (or None, abstain) per sample."""
    return [v.value for v in checked_verdicts(reward, prompts, responses, metas)]


def _call_hook(reward: Any, hook: str) -> None:
    fn = getattr(reward, hook, None)
    if not callable(fn):
        return
    try:
        fn()
    except RewardError:
        raise
    except Exception as e:  # re-raised with the reward's name; the original stays chained
        raise RewardError(f"reward {reward_name(reward)!r} failed in {hook}(): {type(e).__name__}: {e}") from e


def setup(reward: Any) -> None:
    """Call the reward's optional `setup()` (load a model, start a sandbox, ...)."""
    _call_hook(reward, "setup")


def teardown(reward: Any) -> None:
    """Call the reward's optional `teardown()` (free what setup took)."""
    _call_hook(reward, "teardown")


@contextlib.contextmanager
def active(reward: Any) -> Iterator[Any]:
    """`setup()` the reward, yield it, and `teardown()` it even when the block fails."""
    setup(reward)
    try:
        yield reward
    finally:
        teardown(reward)
