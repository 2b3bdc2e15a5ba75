"""The one loader for what a recipe names by import path: rewards and annotators.

A recipe names such a plugin as `{target: "package.module:Name", kwargs: {...}}`. Loading it
is the same steps for every kind (`PluginKind` says which kind: its word, the method it must
have, its error type):

1. `resolve_target`: import the module and look the name up (`import_target`), never
   executing a file; the object must be a class with the kind's method, or a function that
   the kind's decorator marked (`mark_factory`). Anything else (`os:system`) is refused
   before it is called.
2. `check_kwargs`: the kwargs must fit the class's or factory's signature, checked with
   `inspect.signature`, never by calling it.
3. `load`: call it with the kwargs; the object it builds must have the kind's method, and
   gets the target as its `name` when it has none.

An object that already follows the protocol is returned as it is. Every failure raises the
kind's error (`RewardError`, `AnnotatorError`), naming the kind, the target and the recipe key.
posttrain.reward.base and posttrain.annotate.base define the two kinds; this module imports
nothing of posttrain.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PluginKind(Generic[T]):
    """One kind of plugin a recipe names by import path. `T` is its protocol (`Reward`, `Annotator`)."""

    noun: str
    """The word in messages: "reward", "annotator"."""
    method: str
    """The method every object of the kind has: "score", "annotate"."""
    signature: str
    """That method as messages show it: "score(prompts, responses)"."""
    error: type[Exception]
    """What every failure raises."""
    spec: type
    """The recipe's spec model for the kind (a StrictModel with `target` and `kwargs`)."""
    decorator: str
    """The decorator that marks a factory function, as messages name it: "@posttrain.reward.reward_factory"."""

    @property
    def article(self) -> str:
        return "an" if self.noun[:1] in "aeiou" else "a"

    @property
    def mark(self) -> str:
        """The attribute the kind's decorator sets on a factory (one per kind: a reward factory
        is not an annotator factory)."""
        return f"__posttrain_{self.noun}_factory__"


def plugin_name(obj: Any) -> str:
    """The name to put in error messages: the object's `name`, else its class name."""
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) and name else type(obj).__name__


def import_target(target: str, what: str, error: type[Exception]) -> Any:
    """The object an import path `package.module:Name` names, imported (never called).
    Failures raise `error`, naming `what` (reward, annotator) and the target."""
    module_name, _, attr_path = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise error(f"{what} target {target!r}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise error(f"{what} target {target!r}: module {module_name!r} has no attribute "
                        f"{attr_path!r}") from e
    return obj


def mark_factory(kind: PluginKind, fn):
    """Mark `fn` as a factory of `kind`, so that a recipe's `target` may name it."""
    if not inspect.isfunction(fn):
        raise TypeError(f"@{kind.noun}_factory marks functions, got {type(fn).__name__}")
    setattr(fn, kind.mark, True)
    return fn


def resolve_target(kind: PluginKind, target: str) -> Any:
    """The class or marked factory `target` names: imported and checked, never called.

    A class must have the kind's method; a function must carry the kind's factory mark.
    Raises the kind's error otherwise."""
    obj = import_target(target, kind.noun, kind.error)
    if isinstance(obj, type):
        if not callable(inspect.getattr_static(obj, kind.method, None)):
            raise kind.error(f"{kind.noun} target {target!r}: class {obj.__qualname__} has no {kind.signature} "
                             f"method, so it is not {kind.article} {kind.noun} (nothing was called)")
        return obj
    if inspect.isfunction(obj) and inspect.getattr_static(obj, kind.mark, False) is True:
        return obj
    what = "function" if inspect.isfunction(obj) or inspect.isbuiltin(obj) else type(obj).__name__
    raise kind.error(f"{kind.noun} target {target!r} is a {what}, not {kind.article} {kind.noun} class or a "
                     f"function marked {kind.decorator} (nothing was called)")


def check_kwargs(target_obj: Any, kwargs: dict[str, Any], target: str, where: str,
                 error: type[Exception]) -> None:
    """Do `kwargs` fit the signature of `target_obj` (a class's constructor or a factory)?
    Checked with `inspect.signature`, never by calling it: a key it does not take and a
    required argument left out raise `error`, naming the recipe key (`where` is the kwargs'
    key path, e.g. "reward.kwargs") and what the target takes. A target with `**kwargs`
    takes any key; one without a readable signature (a builtin) is left to the call."""
    try:
        signature = inspect.signature(target_obj)
    except (TypeError, ValueError):
        return
    params = list(signature.parameters.values())
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = f"it takes: {', '.join(named)}" if named else "it takes no arguments"
    problems = []
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        problems += [f"{where}.{key}: not an argument of {target} ({takes})" for key in kwargs if key not in named]
    missing = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and (p.name not in kwargs or p.kind is p.POSITIONAL_ONLY)]
    if missing:
        problems.append(f"{where}: {target} needs {', '.join(map(repr, missing))}, which the kwargs do not give "
                        f"({takes})")
    if problems:
        raise error("; ".join(problems))


def load(kind: PluginKind[T], spec: Any) -> T:
    """A ready object of `kind` from a recipe spec (a dict of `target` and `kwargs`), the kind's
    spec model, or an object that already has the kind's method (returned as is)."""
    if isinstance(spec, str):
        raise kind.error(f"{kind.noun} {spec!r}: name {kind.article} {kind.noun} as {{'target': "
                         f"'package.module:Name', 'kwargs': {{...}}}} (or pass {kind.article} {kind.noun} object)")
    if isinstance(spec, dict):
        spec = kind.spec.model_validate(spec)
    if not isinstance(spec, kind.spec):
        if not callable(getattr(spec, kind.method, None)):
            raise kind.error(f"{plugin_name(spec)!r} is not {kind.article} {kind.noun}: it has no {kind.signature} "
                             "method")
        return spec
    factory = resolve_target(kind, spec.target)
    check_kwargs(factory, spec.kwargs, spec.target, f"{kind.noun}.kwargs", kind.error)
    try:
        obj = factory(**spec.kwargs)
    except TypeError as e:
        raise kind.error(f"{kind.noun} target {spec.target!r} rejected kwargs {sorted(spec.kwargs)}: {e}") from e
    if not callable(getattr(obj, kind.method, None)):
        raise kind.error(f"{kind.noun} target {spec.target!r} built a {type(obj).__name__}, "
                         f"which has no {kind.signature} method")
    if not isinstance(getattr(obj, "name", None), str):
        # An object without a name still works; errors and records then use the target.
        try:
            obj.name = spec.target
        except AttributeError as e:
            raise kind.error(f"{kind.noun} target {spec.target!r}: its object has no `name` and none can "
                             "be set") from e
    return obj
