"""Every input in the hash (issue 25): for every stage, each recipe field it reads, changed
alone, changes the stage's input hash (else a changed recipe reuses a stale record).

The reads are found, not listed:
- in `resolve` (which builds the stage's inputs) at run time, with the round's recipe
  wrapped in an object that records every field read through it (`Traced`);
- in the stage's `run(ctx)` statically, since it trains and cannot run here: an AST walk of
  the stage module collects every attribute chain on `ctx.recipe` (and on names bound to
  it), follows a recipe section passed to a function into that function, and maps the
  context fields the worker sets from the recipe (`posttrain.rounds.worker.make_context`)
  back to their recipe fields; for a stage that gets the round's reward, the same walk over
  `Round.build_reward`.
Each field is then changed alone to another valid value, and the stage's hash computed as
the orchestrator does (`Round.stage_inputs`). A field read at run time must change it; a
field read by `resolve` must change it unless the typed inputs come out the same (then the
stage computes the same). The stage's own section is hashed whole, so it is left out; a few
fields change where or how visibly a stage runs, not what it computes (`NEUTRAL`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib
import inspect
import textwrap
import typing

import pytest
from pydantic import BaseModel
from run_folders import record_round, write_recipe

from posttrain.files import hash_json, write_jsonl
from posttrain.recipe import Recipe, load_recipe
from posttrain.records import content_only
from posttrain.rounds.orchestrator import Round
from posttrain.stage import REGISTRY, get

NEUTRAL = {
    "run.report_to": "where training metrics also go, besides the records",
    "run.keep_checkpoints": "whether trainer checkpoints stay after the record is written",
    "models.trust_remote_code": "whether a model's own code may run, not what it computes",
    "sample.cluster": "where generation and scoring run (Ray actors), not what they compute",
}
"""Recipe fields a stage reads that do not change what it computes."""

N = 2  # round 2: the previous round's records are read too


# ----------------------------------------------------------------------------- reads in resolve


class Traced:
    """A recipe (or a section of it) that records the path of every field read through it."""

    def __init__(self, value: BaseModel, path: str, reads: set[str]):
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name):
        value = getattr(self._value, name)
        if name not in type(self._value).model_fields:
            if callable(value) and name.startswith("model_dump"):
                self._reads.add(self._path)  # the whole section
            return value
        return trace(value, f"{self._path}.{name}".lstrip("."), self._reads)


def trace(value, path: str, reads: set[str]):
    if isinstance(value, BaseModel):
        return Traced(value, path, reads)
    if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
        return [Traced(v, f"{path}.{i}", reads) for i, v in enumerate(value)]
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        return {k: Traced(v, f"{path}.{k}", reads) for k, v in value.items()}
    reads.add(path)
    return value


def resolve_reads(rnd: Round, stage: str) -> set[str]:
    reads: set[str] = set()
    real = rnd.recipe
    rnd.recipe = trace(real, "", reads)
    try:
        get(stage).resolve(rnd)
    finally:
        rnd.recipe = real
    return reads


# ----------------------------------------------------------------------------- reads in run (AST)


def chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """`a.b.c` -> ("a", ["b", "c"])."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


@functools.cache
def derived_context_fields() -> dict[str, str]:
    """StageContext fields the worker sets from a recipe field: {ctx field: recipe path}."""
    from posttrain.rounds import worker

    tree = ast.parse(textwrap.dedent(inspect.getsource(worker.make_context)))
    out = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "StageContext":
            for kw in call.keywords:
                for node in ast.walk(kw.value):
                    c = chain(node)
                    if c and c[0] == "recipe" and c[1]:
                        out[kw.arg] = ".".join(c[1])
                        break
    return out


def _imports(tree: ast.AST, module) -> dict[str, object]:
    """Names the module's code can call: its globals and every `from x import y` in it."""
    names = dict(vars(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            try:
                mod = importlib.import_module(node.module)
            except ImportError:
                continue  # an optional package (vllm, ray): not posttrain code, so not followed
            for alias in node.names:
                if hasattr(mod, alias.name):
                    names[alias.asname or alias.name] = getattr(mod, alias.name)
    return names


def _is_section(path: str) -> bool:
    """Whether a recipe path names a section (a model), not a value."""
    kind = Recipe
    for part in path.split(".") if path else []:
        if _container_of_models(kind):
            kind = _container_of_models(kind)  # `part` is a key or an index
            continue
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)) or part not in kind.model_fields:
            return False
        kind = kind.model_fields[part].annotation
        kind = next((a for a in (kind, *typing.get_args(kind)) if _model_or_container(a)), None)
        if kind is None:
            return False
    return _model_or_container(kind)


def _model_or_container(a) -> bool:
    return (isinstance(a, type) and issubclass(a, BaseModel)) or _container_of_models(a) is not None


def _container_of_models(a):
    """The model of a list[Model] or dict[str, Model] annotation, else None."""
    if typing.get_origin(a) in (list, dict):
        inner = typing.get_args(a)[-1]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return None


def static_reads(func_or_module, roots: dict[str, str], depth: int = 0) -> set[str]:
    """Recipe paths read in the source of `func_or_module`, where each name in `roots` is
    bound to a recipe path ("" for the recipe; "ctx" to the stage context)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func_or_module)))
    callables = _imports(tree, inspect.getmodule(func_or_module))
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
              and not any(n in ast.walk(m) for m in ast.walk(tree)
                          if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m is not n)]
    reads: set[str] = set()
    for scope in scopes:  # each function (with the functions inside it) binds its own names
        reads |= _scope_reads(scope, dict(roots), callables, depth)
    return reads


def _scope_reads(tree: ast.AST, roots: dict[str, str], callables: dict, depth: int) -> set[str]:
    derived = derived_context_fields()
    # names bound to ctx.recipe or to a part of it: `r = ctx.recipe`, `cfg, r = ctx.config, ctx.recipe`
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            pairs = []
            for target in node.targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs += zip(target.elts, node.value.elts)
                else:
                    pairs.append((target, node.value))
            for target, value in pairs:
                path = recipe_path(value, roots, derived)
                if isinstance(target, ast.Name) and path is not None:
                    roots[target.id] = path
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    reads: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Attribute, ast.Name)) or isinstance(parents.get(node), ast.Attribute):
            continue  # only whole chains
        call = parents.get(node)
        if isinstance(call, ast.keyword):
            call = parents.get(call)
        passed = isinstance(call, ast.Call) and node is not call.func and depth < 3
        if isinstance(node, ast.Name) and (node.id == "ctx" or roots.get(node.id) == "ctx"):
            if passed:  # the context itself, to a function of another module: what it reads there
                reads |= _follow(call, node, "ctx", callables, depth, other_module=True) or set()
            continue
        path = recipe_path(node, roots, derived)
        if not path:
            continue
        if _is_section(path) and passed:
            followed = _follow(call, node, path, callables, depth)
            if followed is not None:
                reads |= followed
                continue
        reads.add(path)
    return reads


def recipe_path(node: ast.AST, roots: dict[str, str], derived: dict[str, str]) -> str | None:
    c = chain(node)
    if c is None:
        return None
    name, attrs = c
    if name == "ctx" or roots.get(name) == "ctx":
        if attrs[:1] == ["recipe"]:
            return ".".join(attrs[1:])
        if name == "ctx" and attrs and attrs[0] in derived:
            return derived[attrs[0]]
        return None
    if name in roots and roots[name] != "ctx":
        return ".".join(p for p in (roots[name], *attrs) if p)
    return None


def _follow(call: ast.Call, arg: ast.AST, path: str, callables: dict, depth: int,
            other_module: bool = False) -> set[str] | None:
    """The reads of a recipe section (or the context: "ctx") passed to a function, inside
    that function (with `other_module`, only where the walk does not already cover it)."""
    c = chain(call.func)
    fn = callables.get(c[0]) if c else None
    for attr in (c[1] if c else []):
        fn = getattr(fn, attr, None)
    if not inspect.isfunction(fn) or not fn.__module__.startswith("posttrain"):
        return None
    if other_module and fn.__module__ == callables.get("__name__"):
        return None
    params = list(inspect.signature(fn).parameters)
    if arg in call.args:
        if call.args.index(arg) >= len(params):
            return None
        param = params[call.args.index(arg)]
    else:
        param = next(kw.arg for kw in call.keywords if kw.value is arg)
    return static_reads(fn, {param: path}, depth + 1)


def run_reads(stage: str) -> set[str]:
    """What the stage's module reads of the recipe, and for a stage that gets the round's
    reward, what the orchestrator reads to build it (`Round.build_reward`)."""
    reads = static_reads(importlib.import_module(f"posttrain.stages.{stage}"), {"ctx": "ctx"})
    if get(stage).uses_reward:
        reads |= static_reads(Round.build_reward, {"self": "ctx"})  # a Round has .recipe as a context has
    return reads


# ----------------------------------------------------------------------------- changing one field


@pytest.fixture(scope="module", params=["everything on", "defaults"])
def round2(request, tmp_path_factory, tiny_model_dir) -> Round:
    """Round 2 of a run whose every stage has a record in rounds 1 and 2: with every stage
    and option on (curate, annotate, capabilities, two DPO variants, a checker), and with
    the defaults (where `resolve` takes its other branches)."""
    folder = tmp_path_factory.mktemp("hashes")
    sections = {} if request.param == "defaults" else dict(
        curate={"enabled": True, "preferences": True, "rules": {"enabled": True}, "rm_quality": {"enabled": True},
                "dedup": {"enabled": True}},
        annotate={"prompts": [str(folder / "data" / "prompts.jsonl")], "comparisons": 4,
                  "annotator": {"target": "posttrain.annotate.world:WorldAnnotator"}},
        capabilities={"math": {"system_prompt": "Be brief."}},
        dpo={"variants": [{"seed": 0}, {"seed": 1}]},
        decontaminate={"mode": "warn", "n": 8},
        eval={"variants": True, "checker": {"target": "posttrain.world.task:TaskReward"}})
    recipe = write_recipe(folder, tiny_model_dir, **sections)
    run = folder / "run"
    for n in (1, 2):
        record_round(run, n, tiny_model_dir, stages=REGISTRY)
    write_jsonl(folder / "other.jsonl", [{"other": True}])
    return Round(N, load_recipe(recipe), run)


def stage_hash(rnd: Round, stage: str) -> tuple[str, dict]:
    """(input hash, the typed inputs as resolved) of `stage` in `rnd`."""
    inputs, hashed = rnd.stage_inputs(get(stage))
    return hash_json(content_only(hashed)), dataclasses.asdict(inputs)


def get_path(d, parts):
    for p in parts:
        d = d[int(p)] if isinstance(d, list) else d[p]
    return d


def candidates(value, other_file: str, words: list[str], sections: list[dict]):
    """Other values for a field, most likely valid first."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2 + 1]
    if isinstance(value, float):
        return [value * 2 + 0.25, value / 2 + 0.01]
    if isinstance(value, str):
        return [*words, other_file, value + "-changed", *sections]
    if isinstance(value, (list, tuple)):
        return [[*value, other_file], list(value)[:-1], list(reversed(value)), [*value, *value[-1:]]]
    if isinstance(value, dict):
        return [{k: v for k, v in list(value.items())[:-1]}] if value else []
    return [True, 1, 0.5, *words, other_file, ["changed"]]  # None: whatever the field accepts


def names_in(recipe: Recipe) -> tuple[list[str], list[dict]]:
    """Every word the recipe's schema allows somewhere (Literal choices) and every name it
    holds (keys, strings), and every import-path spec it holds (`{target: ...}`): the other
    values a field may take."""
    words: dict[str, None] = {}
    specs: list[dict] = []

    def walk(model: type[BaseModel]):
        for field in model.model_fields.values():
            for a in (field.annotation, *typing.get_args(field.annotation)):
                if typing.get_origin(a) is typing.Literal:
                    words.update(dict.fromkeys(x for x in typing.get_args(a) if isinstance(x, str)))
                inner = _container_of_models(a) or a
                if isinstance(inner, type) and issubclass(inner, BaseModel) and inner is not model:
                    walk(inner)

    def held(d):
        if isinstance(d, dict):
            if "target" in d:
                specs.append(d)
            words.update(dict.fromkeys(d))
            for v in d.values():
                held(v)
        elif isinstance(d, list):
            for v in d:
                held(v)
        elif isinstance(d, str) and "/" not in d:
            words[d] = None

    walk(Recipe)
    held(recipe.model_dump(mode="json"))
    return list(words), [*specs, {"target": "posttrain.world.task:TaskReward"}]  # a spec for a recipe with none


def changed(rnd: Round, stage: str, path: str):
    """Round `rnd` with the recipe field `path` changed to each valid other value, in turn."""
    base = rnd.recipe.model_dump(mode="json")
    parts = path.split(".")
    value = get_path(base, parts)
    other = str(rnd.run_dir.parent / "other.jsonl")
    for candidate in candidates(value, other, *names_in(rnd.recipe)):
        if candidate == value:
            continue
        raw = copy.deepcopy(base)
        parent = get_path(raw, parts[:-1])
        parent[int(parts[-1]) if isinstance(parent, list) else parts[-1]] = candidate
        try:
            recipe = Recipe.model_validate(raw)
        except ValueError:
            continue
        if get_path(recipe.model_dump(mode="json"), parts) == value:
            continue
        new = Round(rnd.n, rnd.loaded, rnd.run_dir)
        new.recipe = recipe
        new.hasher, new.verified = rnd.hasher, rnd.verified  # the files are the same: hashed and checked once
        try:
            new.stage_inputs(get(stage))
        except (ValueError, KeyError, FileNotFoundError, TypeError):
            continue  # resolves to nothing usable: not a value a run could have
        yield candidate, new


def leaves(recipe: Recipe, path: str) -> list[str]:
    """`path`, or every value under it when it names a section."""
    try:
        value = get_path(recipe.model_dump(mode="json"), path.split(".")) if path else recipe.model_dump(mode="json")
    except KeyError:
        return [path]  # a section the recipe leaves out (None)
    if isinstance(value, (dict, list)) and _is_section(path):
        keys = value if isinstance(value, dict) else [str(i) for i in range(len(value))]
        return [leaf for k in keys for leaf in leaves(recipe, f"{path}.{k}".lstrip("."))]
    return [path]


def in_recipe(recipe: Recipe, path: str) -> str:
    """The longest start of `path` that names a recipe field, or a key or index of one the
    recipe holds (`capabilities.items` -> `capabilities`: a method, not a key)."""
    parts: list[str] = []
    kind, d = Recipe, recipe.model_dump(mode="json")
    for part in path.split("."):
        if _container_of_models(kind) is not None:
            if not ((isinstance(d, dict) and part in d) or (isinstance(d, list) and part.isdigit()
                                                             and int(part) < len(d))):
                break
            kind, d = _container_of_models(kind), get_path(d, [part])
        elif isinstance(kind, type) and issubclass(kind, BaseModel) and part in kind.model_fields \
                and isinstance(d, dict):  # not into a section the recipe leaves out, or holds as a word
            ann = kind.model_fields[part].annotation
            kind = next((a for a in (ann, *typing.get_args(ann)) if _model_or_container(a)), None)
            d = d.get(part) if isinstance(d, dict) else None
        else:
            break
        parts.append(part)
    return ".".join(parts)


def reads_of(rnd: Round, stage: str) -> tuple[set[str], set[str]]:
    """(fields read at run time, fields read only by resolve), without the neutral ones and
    the stage's own section (hashed whole as its `config`)."""
    at_run = {leaf for p in run_reads(stage) for leaf in leaves(rnd.recipe, in_recipe(rnd.recipe, p))}
    at_resolve = {leaf for p in resolve_reads(rnd, stage) for leaf in leaves(rnd.recipe, p)}
    own = get(stage).config or stage
    skip = lambda p: any(p == n or p.startswith(n + ".") for n in (*NEUTRAL, own))  # noqa: E731
    return {p for p in at_run if not skip(p)}, {p for p in at_resolve if not skip(p)} - at_run


def test_the_reads_are_found():
    """The walk sees what the issue found hidden, through aliases and helper functions."""
    assert {"sft.targets", "run.device"} <= run_reads("curate")
    eval_reads = run_reads("eval")
    assert {"run.device", "sample.dtype", "sample.vllm.tensor_parallel_size", "sample.vllm.python",
            "sample.cluster", "seed"} <= eval_reads
    assert "sample" not in eval_reads  # followed into engine_options, not taken whole
    assert "models.trust_remote_code" in run_reads("rm")  # through ctx.trust_remote_code


@pytest.mark.parametrize("stage", REGISTRY)
def test_every_recipe_field_a_stage_reads_is_in_its_hash(round2, stage):
    if not get(stage).enabled(round2.recipe):
        pytest.skip(f"{stage} is off in this recipe")
    at_run, at_resolve = reads_of(round2, stage)
    before, before_inputs = stage_hash(round2, stage)
    missing, unchangeable = [], []
    for path in sorted(at_run | at_resolve):
        tried = False
        for candidate, rnd in changed(round2, stage, path):
            tried = True
            after, after_inputs = stage_hash(rnd, stage)
            if after == before and (path in at_run or after_inputs != before_inputs):
                missing.append(f"{path} = {candidate!r}")
            break
        if not tried:
            unchangeable.append(path)
    assert not missing, f"{stage}: changing these recipe fields leaves its hash as it was: {missing}"
    assert not unchangeable, f"{stage}: found no valid other value for {unchangeable}"
    assert at_run | at_resolve, stage  # the walk found something to change


