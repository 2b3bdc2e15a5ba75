"""The annotator protocol: requests (two responses to one prompt) in, labels out.

An annotator is anything with a `name` and an `annotate(requests)` method, shaped like a
reward (posttrain.reward.base):

    requests: list[Request]          each: a stable id, the prompt, responses a and b (with
                                     the model and sampling settings that produced each)
    returns:  list[Label | None]     one per request, in order:
                                     Label(preferred="a"|"b", strength, edited?)  a judgement
                                     Label(preferred=None, reason=...)            an abstention
                                     None                                         not labelled yet

None is how a human annotation tool says "still waiting": the `annotate` step keeps the labels
it has, and asks again on the next run. An abstention is final: the pair is skipped.

Optional: `attach(folder)` is called once with the step's folder, where an annotator keeps
what must survive between runs (a Label Studio project id); `where()` says where people
label (shown by `posttrain status` while the round waits).

A recipe names an annotator by import path, as a reward: `{target: "pkg.mod:Name", kwargs:
{...}}`; the target must be a class with an `annotate` method or a function marked
`@annotator_factory`. Python code can pass an object. Callers never call `annotate`
directly: `checked_annotate` checks the answer and fails loudly, naming the annotator.

Labels cannot be joined to the wrong response: a label carries its request's id and the
request's `pair_sha256` (a hash of the prompt and both responses), and both are checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from posttrain import loader
from posttrain.data import STRENGTHS
from posttrain.files import hash_json
from posttrain.loader import PluginKind, plugin_name
from posttrain.schema import StrictModel

Side = Literal["a", "b"]


class AnnotatorError(RuntimeError):
    """An annotator broke its contract or raised; the message names the annotator."""


@dataclass(frozen=True)
class Response:
    """One response of a comparison, with where it came from."""

    text: str
    model: str
    """Which model wrote it (the recipe's name for it, e.g. `round_02/dpo/v1`)."""
    sampling: dict = field(default_factory=dict)
    """The sampling settings that produced it (temperature, top_p, max_new_tokens, seed, backend)."""


@dataclass(frozen=True)
class Request:
    """A comparison to label: which of two responses to `prompt` is better."""

    id: str
    """Stable across runs: the round and the prompt's id."""
    prompt: list[dict]
    """The conversation before the responses (messages)."""
    a: Response
    b: Response
    meta: dict = field(default_factory=dict)
    """The prompt row's other fields (a reference answer, unit tests), for checkers."""

    @property
    def pair_sha256(self) -> str:
        """What a label is joined to: the prompt and both responses' texts, in order."""
        return pair_hash(self.prompt, self.a.text, self.b.text)

    def response(self, side: Side) -> Response:
        return self.a if side == "a" else self.b

    def to_row(self) -> dict:
        return {"id": self.id, "pair_sha256": self.pair_sha256, "prompt": self.prompt,
                "response_a": asdict(self.a), "response_b": asdict(self.b), "meta": self.meta}

    @classmethod
    def from_row(cls, row: dict) -> Request:
        return cls(id=row["id"], prompt=row["prompt"], a=Response(**row["response_a"]),
                   b=Response(**row["response_b"]), meta=row.get("meta") or {})


def pair_hash(prompt: list[dict], text_a: str, text_b: str) -> str:
    return hash_json({"prompt": prompt, "a": text_a, "b": text_b})


@dataclass(frozen=True)
class Label:
    """An annotator's answer for one request."""

    request_id: str
    pair_sha256: str
    """The request's `pair_sha256` when it was labelled; a label for other texts is refused."""
    preferred: Side | None
    """The better response; None: the annotator abstains and the pair is skipped."""
    strength: str | None = None
    """How much better (posttrain.data.STRENGTHS); required unless abstaining."""
    edited: str | None = None
    """An edited, better version of the preferred response (edited > chosen > rejected)."""
    annotator: str = ""
    reason: str | None = None
    """Why the annotator abstained (or anything else worth keeping)."""

    @classmethod
    def for_request(cls, request: Request, preferred: Side | None, strength: str | None = None, *,
                    edited: str | None = None, annotator: str = "", reason: str | None = None) -> Label:
        return cls(request.id, request.pair_sha256, preferred, strength, edited, annotator, reason)

    def to_row(self) -> dict:
        return {"id": self.request_id, "pair_sha256": self.pair_sha256, "preferred": self.preferred,
                "strength": self.strength, "edited": self.edited, "annotator": self.annotator,
                "reason": self.reason}


def label_problems(label: Label) -> list[tuple[str, str]]:
    """(field, problem) for a label that is not a valid judgement or abstention."""
    out = []
    if label.preferred not in ("a", "b", None):
        out.append(("preferred", f"must be 'a', 'b' or null (abstain), got {label.preferred!r}"))
    if label.preferred is not None and label.strength not in STRENGTHS:
        out.append(("strength", f"must be one of {', '.join(STRENGTHS)}, got {label.strength!r}"))
    if label.preferred is None and label.strength is not None:
        out.append(("strength", "an abstention has no strength"))
    if label.edited is not None and (not isinstance(label.edited, str) or not label.edited.strip()):
        out.append(("edited", "must be a non-empty string or absent"))
    if label.edited is not None and label.preferred is None:
        out.append(("edited", "an abstention cannot carry an edit"))
    return out


def strength_of(gap: float, thresholds: tuple[float, float, float] | list[float]) -> str | None:
    """Label for a score gap (preferred - other) >= 0: the first of significantly_better,
    better, slightly_better whose threshold the gap reaches, else marginally_better; None for
    a tie (gap <= 0: the pair is dropped)."""
    if gap <= 0:
        return None
    for label, t in zip(STRENGTHS, thresholds):
        if gap >= t:
            return label
    return STRENGTHS[-1]


# ------------------------------------------------------------------------- the protocol


@runtime_checkable
class Annotator(Protocol):
    """What posttrain calls an annotator. `attach` and `where` are optional (module docstring)."""

    name: str

    def annotate(self, requests: list[Request]) -> list[Label | None]: ...


class AnnotatorSpec(StrictModel):
    """An annotator named in a recipe: an import path and keyword arguments."""

    target: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    """Import path `package.module:Name`: an annotator class (one with an `annotate` method) or
    a function marked `@annotator_factory`, called with `kwargs`. Built in:
    `posttrain.annotate.world:WorldAnnotator`, `posttrain.annotate.ai:RewardAnnotator`,
    `posttrain.annotate.labelstudio:LabelStudioAnnotator`, `posttrain.annotate.jsonl:ExternalAnnotator`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the class or factory."""


ANNOTATOR: PluginKind[Annotator] = PluginKind(
    noun="annotator", method="annotate", signature="annotate(requests)", error=AnnotatorError,
    spec=AnnotatorSpec, decorator="@posttrain.annotate.annotator_factory")
"""Annotators for the one loader (posttrain.loader), the rewards' loader too."""


def annotator_factory(fn):
    """Mark a function as an annotator factory, so that a recipe's `target` may name it."""
    return loader.mark_factory(ANNOTATOR, fn)


def annotator_name(obj: Any) -> str:
    """The name to put in error messages: the annotator's `name`, else its class name."""
    return plugin_name(obj)


def resolve_annotator_target(target: str) -> Any:
    """The annotator class or marked factory `target` names: imported and checked, never called."""
    return loader.resolve_target(ANNOTATOR, target)


def check_annotator_spec(spec: AnnotatorSpec | dict, where: str) -> None:
    """Check a recipe's annotator spec without calling anything: the target is an annotator,
    its kwargs fit its signature, and every reward spec in them (for AI feedback) passes
    `check_reward_spec`. Raises AnnotatorError naming the recipe key."""
    from posttrain.reward.base import RewardError, check_nested_reward_specs

    if isinstance(spec, dict):
        spec = AnnotatorSpec.model_validate(spec)
    try:
        target_obj = resolve_annotator_target(spec.target)
    except AnnotatorError as e:
        raise AnnotatorError(f"{where}.target: {e}") from None
    loader.check_kwargs(target_obj, spec.kwargs, spec.target, f"{where}.kwargs", AnnotatorError)
    try:
        check_nested_reward_specs(spec.kwargs, f"{where}.kwargs")
    except RewardError as e:
        raise AnnotatorError(str(e)) from None


def load_annotator(spec: AnnotatorSpec | dict | Any) -> Annotator:
    """A ready annotator from a recipe spec, an `AnnotatorSpec`, or an object that already
    follows the protocol (returned as is); `posttrain.loader.load`, as rewards load."""
    return loader.load(ANNOTATOR, spec)


def checked_annotate(annotator: Annotator, requests: list[Request]) -> list[Label | None]:
    """`annotator.annotate(requests)`, checked: one answer per request, each label for its own
    request (id and pair hash) and well formed. Every failure raises AnnotatorError naming
    the annotator and the request."""
    name = annotator_name(annotator)
    if not requests:
        return []
    try:
        labels = annotator.annotate(list(requests))
    except AnnotatorError:
        raise
    except Exception as e:  # re-raised with the annotator's name; the original stays chained
        raise AnnotatorError(f"annotator {name!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(labels, (list, tuple)) or len(labels) != len(requests):
        got = len(labels) if isinstance(labels, (list, tuple)) else type(labels).__name__
        raise AnnotatorError(f"annotator {name!r} returned {got} answers for {len(requests)} requests")
    for req, label in zip(requests, labels):
        if label is None:
            continue
        if not isinstance(label, Label):
            raise AnnotatorError(f"annotator {name!r} returned a {type(label).__name__} for request {req.id!r}, "
                                 "expected a posttrain.annotate.Label or None")
        if label.request_id != req.id:
            raise AnnotatorError(f"annotator {name!r} answered request {req.id!r} with a label for "
                                 f"{label.request_id!r}")
        if label.pair_sha256 != req.pair_sha256:
            raise AnnotatorError(f"annotator {name!r}: its label for request {req.id!r} was made for other "
                                 "responses (pair_sha256 differs): refusing to join it to these")
        problems = label_problems(label)
        if problems:
            raise AnnotatorError(f"annotator {name!r}, request {req.id!r}: field {problems[0][0]!r} "
                                 f"{problems[0][1]}")
    return list(labels)


def attach(annotator: Any, folder: Path) -> None:
    fn = getattr(annotator, "attach", None)
    if callable(fn):
        fn(Path(folder))


def where(annotator: Any) -> str | None:
    fn = getattr(annotator, "where", None)
    return str(fn()) if callable(fn) else None
