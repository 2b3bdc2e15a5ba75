"""Execution-checked reward for code: run the prompt's unit tests against the response's code.

Score = (tests passed) / (tests), in [0, 1]; `None` (abstain) when the prompt has no tests.
A crash, a hang, a fork bomb, a flood of output or a hostile program fails only its own
sample: every sample runs in sandboxed processes with hard limits, and nothing it does can
raise an exception in the caller.

Where the tests come from (shared with `posttrain.reward.math`)
----------------------------------------------------------------
The reward protocol passes only (prompt messages, response). The reference data lives in
the prompt rows (`posttrain.data.Prompt.meta`: `tests` for code, `answer` for math), so a
checking reward offers two doors, and both end in the same `score_with_meta`:

* `score_with_meta(prompts, responses, metas)`: `metas[i]` is prompt i's meta dict. The
  `sample` stage calls this when the reward has it (`hasattr(reward, "score_with_meta")`),
  because it already holds the `Prompt` rows. No file lookup, no ambiguity.
* `score(prompts, responses)`: the plain protocol. The reward must have been built with
  `prompts_file=` (a JSONL of prompt rows: `prompt` as text or messages, plus `tests` /
  `answer`); each scored prompt is matched to its row by `prompt_key` (a hash of the
  non-system messages, so a capability system prompt added during sampling does not break
  the match). A prompt not in the file gets `None` (abstain). Without `prompts_file`,
  `score` raises: silently abstaining on everything would look like a working reward.

`tests` is a list of test snippets (usually `assert` statements; each item is one test)
or one source string, split into one test per top-level `assert`, every other top-level
statement (imports, helpers) being shared setup that runs before the tests.

What the code is
----------------
The last ```python (or ```py / ```python3) fenced block of the response; else the last
fenced block of any language; else the whole response. The last block because models
usually show a sketch first and the final program last.

Who decides a test's verdict: never the code under test
-------------------------------------------------------
Anything that runs in the same interpreter as the program can be changed by it (builtins,
`exec`, the harness's own frames, the result channel, `__eq__`). So the program's process
is never asked "did the test pass?". It is asked only for *values*, and the verdict is
reached where the program cannot reach. Each test is planned, in the parent, from its AST
(`plan_test`); the names a test uses that neither the test setup nor the builtins define
are the program's, and each maximal call/attribute/subscript chain rooted at one of them
(`add(1, 2)`, `Solution().two_sum([2, 7], 9)`) is a *program expression*:

* **compare** -- `assert EXPR == LITERAL` (any one comparison operator, either side),
  `assert EXPR`, `assert not EXPR`, where EXPR is one program expression and LITERAL is a
  Python literal. Only EXPR enters the sandbox; the expected value never does. The sandbox
  returns EXPR's value as plain data and the parent compares.
* **judged** -- any other test whose program expressions use no name the test itself binds
  and sit outside loops, comprehensions and lambdas (`assert close(half(1), 0.5)`,
  `assert sorted(f(x)) == [1, 2]`, try/except around a call). The sandbox evaluates the
  program expressions; a second sandboxed process that holds no program code (the *judge*)
  runs the test setup and the test with each program expression replaced by its recorded
  value (or its recorded exception, re-raised as the nearest builtin exception class).
* **opaque** -- the rest (a test that binds `s = Stack()` and calls `s.push(1)`, a call in a
  comprehension or in a loop over anything but a literal list: `for a, b, want in [(1, 2,
  3), ...]: assert add(a, b) == want` is unrolled into judged form first). Each runs in a fresh interpreter with the program, and counts only by an exit
  status chosen at random per run and observed from outside. This is the one form where the
  program shares an interpreter with the expected values: a program that finds the harness's
  frame can still pass it, and an always-equal object passes `==` inside it. Prefer the
  other two forms; `opaque_tests="reject"` refuses suites that need this one.

Values cross the boundary through `posttrain.reward._plain`: exact builtin types only
(`type(x) is int`, never a subclass), recursively, as tagged JSON decoded by the parent.
An object whose `__eq__` always answers True, an int subclass, an object with a lying
`__bool__` are not plain: that expression fails. The value channel needs no secret: a
program that forges lines on it (it can: it owns its process) can only claim values, and a
claimed value passes only if it equals the expected value it never saw, which is what a
program that returned that value would get. Monkeypatching `exec`, `compile`, `json` or the
harness changes what the program's process says, never what the parent or the judge decides.

A test passes only when the program also loaded (ran to the end of its module code without
raising): a program that exits or loops at load time scores 0 even on tests that ignore it.

Isolation: what is enforced, and by whom
----------------------------------------
`isolation="auto"` (the default) picks the first mode that works on this machine, checked
by running a real probe in `setup()`. There is no unisolated mode: the program, the judge
and the opaque tests all run under the same OS isolation. `self.isolation` says which mode.

* `"namespace"` (running as root; what this project's machines use) -- OS-enforced:
  - network: a fresh network namespace (`unshare --net`) with only a loopback that is down;
    every connect fails, including to ports listening on the host's 127.0.0.1;
  - files: a fresh mount namespace and `chroot` into a tmpfs root that holds only
    read-only bind mounts of `/usr` (+ the lib/bin links) and the interpreter's prefix,
    `/dev/null`, and the working folder `/work` (its own size-capped tmpfs, gone when the
    run ends). No `/etc`, `/home`, `/root`, `/tmp`, `/proc` of the host are visible;
  - identity: the program runs as an unprivileged uid (one per worker slot, from
    `uid_base`), with no capabilities and `no_new_privs`, so it can neither undo the
    chroot nor raise its limits;
  - processes: a fresh PID namespace; when the harness (its init) exits or the wall clock
    runs out, the kernel kills every process in it, including ones that called `setsid`;
  - limits (setrlimit, applied before the untrusted code runs, irreversible for a
    non-root uid): CPU seconds, address space, number of processes (per uid, which is
    why each slot gets its own uid), file size, open files, no core dumps.
* `"userns"` (not root, unprivileged user namespaces allowed): the same, with the user
  namespace's root mapped to the caller's uid; capabilities are dropped before the
  program starts. RLIMIT_NPROC then counts all of the caller's processes, so keep
  `max_procs` above what the caller itself runs. (Not exercised on root-only CI.)

The former `"process"` mode (a plain child guarded by an audit hook) is gone: as root it
let a program start `/bin/sh` on the host through `_posixsubprocess.fork_exec`, which no
audit event covers.

In every mode the wall-clock limit kills the process group and output is read up to
`max_output_bytes` (the rest is discarded, so printing forever costs nothing but time).
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import hashlib
import json
import logging
import operator
import os
import queue
import re
import reprlib
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.reward import _plain

log = logging.getLogger(__name__)

Message = dict[str, Any]

ISOLATION_MODES = ("auto", "namespace", "userns")

# ---------------------------------------------------------------------------------------
# References: prompt rows with tests / answers, looked up by prompt


def prompt_key(messages: Sequence[Message]) -> str:
    """A stable key for a prompt conversation, ignoring system messages (the sample stage
    may add a capability system prompt that the prompt file does not have)."""
    kept = [(str(m.get("role")), str(m.get("content"))) for m in messages if m.get("role") != "system"]
    return hashlib.sha256(json.dumps(kept, ensure_ascii=False).encode("utf-8")).hexdigest()


class ReferenceIndex:
    """Prompt rows of a JSONL file, keyed by `prompt_key`, keeping the fields a reward needs.

    A row needs `prompt` (text, or a list of {"role", "content"} messages); every other
    field is kept as meta. Two rows with the same prompt but different references are an
    error (which one would be right?); identical duplicates are fine.
    """

    def __init__(self, path: str | os.PathLike, fields: Sequence[str]):
        self.path = str(path)
        self.fields = tuple(fields)
        self._metas: dict[str, dict] = {}
        self._rows: dict[str, int] = {}
        try:
            mode = os.stat(self.path).st_mode
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read the prompts file: {e.strerror}") from None
        if not stat.S_ISREG(mode):  # a FIFO would hang the open, /dev/zero never end
            raise ValueError(f"{self.path}: the prompts file is not a regular file")
        with open(self.path, encoding="utf-8", newline="\n") as f:
            for row_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}: row {row_no}: not valid JSON: {e}") from e
                except RecursionError:
                    raise ValueError(f"{self.path}: row {row_no}: not valid JSON: nested too deep") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{self.path}: row {row_no}: expected a JSON object")
                messages = _row_messages(row, self.path, row_no)
                key = prompt_key(messages)
                meta = {k: row[k] for k in self.fields if k in row}
                if key in self._metas and self._metas[key] != meta:
                    raise ValueError(
                        f"{self.path}: row {row_no}: field 'prompt': same prompt as row {self._rows[key]} "
                        f"but different {'/'.join(self.fields)}")
                self._metas[key] = meta
                self._rows[key] = row_no

    def __len__(self) -> int:
        return len(self._metas)

    def meta_for(self, messages: Sequence[Message]) -> dict:
        """The row's fields for this prompt, or {} when the prompt is not in the file."""
        return self._metas.get(prompt_key(messages), {})


def _row_messages(row: dict, path: str, row_no: int) -> list[Message]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return prompt
    raise ValueError(f"{path}: row {row_no}: field 'prompt': expected text or a list of "
                     "{'role', 'content'} messages")


# ---------------------------------------------------------------------------------------
# Extracting the program and the tests

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def extract_code(response: str) -> str:
    """The program in a response: the last ```python block, else the last fenced block,
    else the whole response (a model may answer with bare code)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    python_blocks = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return response


@dataclass(frozen=True)
class Suite:
    setup: str          # shared statements run after the program, before the tests
    tests: list[str]    # one snippet per test


def parse_tests(tests: Any, where: str = "tests") -> Suite:
    """A suite from a prompt's `tests`: a list of snippets (one test each), or one source
    string whose top-level `assert`s are the tests and whose other statements are setup."""
    if isinstance(tests, list):
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ValueError(f"{where}: expected a non-empty list of test source strings")
        for i, t in enumerate(tests):
            try:
                ast.parse(t)
            except SyntaxError as e:
                raise ValueError(f"{where}[{i}]: not valid Python: {e}") from e
        return Suite(setup="", tests=list(tests))
    if isinstance(tests, str):
        try:
            tree = ast.parse(tests)
        except SyntaxError as e:
            raise ValueError(f"{where}: not valid Python: {e}") from e
        setup = [ast.unparse(n) for n in tree.body if not isinstance(n, ast.Assert)]
        asserts = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Assert)]
        if not asserts:
            raise ValueError(f"{where}: the test source has no top-level assert statement")
        return Suite(setup="\n".join(setup), tests=asserts)
    raise ValueError(f"{where}: expected a list of test strings or one test source string, "
                     f"got {type(tests).__name__}")


# ---------------------------------------------------------------------------------------
# Planning a test: which parts are the program's, and who decides the verdict

_BUILTIN_NAMES = frozenset(dir(builtins))
# Inside these, an expression may run several times or never: its one recorded value
# would not stand for what the test sees.
_REPEATING = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.For, ast.AsyncFor,
              ast.While, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_COMPARE_OPS = {ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne), ast.Lt: ("<", operator.lt),
                ast.LtE: ("<=", operator.le), ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
                ast.In: ("in", lambda a, b: a in b), ast.NotIn: ("not in", lambda a, b: a not in b)}
_OP_FUNCS = {name: fn for name, fn in _COMPARE_OPS.values()}
VALUE_FUNCTION = "__posttrain_value__"   # what a program expression becomes in the judge


@dataclass(frozen=True)
class TestPlan:
    """How one test is decided (see the module docstring).

    kind: "compare" | "judged" | "opaque". `expressions`: the program expressions the sandbox
    evaluates, in source order (compare: exactly one). compare: `op` ("==", "<", "in", ...,
    "truthy", "falsy"), `expected` (the literal; stays in the parent), `literal_left`.
    judged: `judge_source`, the test with expression k replaced by `__posttrain_value__(k)`.
    """
    kind: str
    expressions: tuple[str, ...] = ()
    op: str | None = None
    expected: Any = None
    literal_left: bool = False
    judge_source: str | None = None


def _bound_names(tree: ast.AST) -> set[str] | None:
    """Every name `tree` binds anywhere (assignment, def, import, argument, except, ...);
    None when it star-imports (then which names it binds is unknown)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
    return names


def _free_loads(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


class _ReplaceExpressions(ast.NodeTransformer):
    def __init__(self, index: dict[int, int]):
        self.index = index

    def visit(self, node):
        k = self.index.get(id(node))
        if k is not None:
            return ast.copy_location(ast.Call(ast.Name(VALUE_FUNCTION, ast.Load()), [ast.Constant(k)], []), node)
        return super().visit(node)


_MAX_UNROLL = 64


def _literal_ast(value: Any) -> ast.expr | None:
    """An AST for `value` that evaluates back to it, or None (nan, inf, or not a literal)."""
    try:
        node = ast.parse(repr(value), mode="eval").body
        same = ast.literal_eval(node) == value and type(ast.literal_eval(node)) is type(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return node if same else None


class _Substitute(ast.NodeTransformer):
    def __init__(self, values: dict[str, ast.expr]):
        self.values = values

    def visit_Name(self, node: ast.Name):
        if isinstance(node.ctx, ast.Load) and node.id in self.values:
            return ast.copy_location(copy.deepcopy(self.values[node.id]), node)
        return node


def _unroll_literal_loops(tree: ast.Module) -> ast.Module:
    """`for a, b, want in [(1, 2, 3), ...]: BODY` at the top of a test becomes BODY once per
    item with the loop names replaced by the item's values, so each call in it is a plain
    program expression (`add(1, 2)`) that the safer plans can take. Loops that break, bind
    their own names again, hold functions or comprehensions, or iterate over anything but a
    literal list/tuple of at most 64 items are left as they are."""
    body: list[ast.stmt] = []
    for stmt in tree.body:
        unrolled = None
        if isinstance(stmt, ast.For) and not stmt.orelse:
            unrolled = _unroll(stmt)
        body.extend(unrolled if unrolled is not None else [stmt])
    tree.body = body
    return tree


def _unroll(loop: ast.For) -> list[ast.stmt] | None:
    ok, items = _literal(loop.iter)
    if not ok or not isinstance(items, (list, tuple)) or not items or len(items) > _MAX_UNROLL:
        return None
    target = loop.target
    names = [target.id] if isinstance(target, ast.Name) else (
        [e.id for e in target.elts if isinstance(e, ast.Name)] if isinstance(target, ast.Tuple) else [])
    if not names or (isinstance(target, ast.Tuple) and len(names) != len(target.elts)):
        return None
    inner = ast.Module(body=loop.body, type_ignores=[])
    if any(isinstance(n, (ast.Break, ast.Continue, ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                          ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Global, ast.Nonlocal))
           for n in ast.walk(inner)):
        return None
    bound = _bound_names(inner)
    if bound is None or set(names) & bound:
        return None
    out: list[ast.stmt] = []
    for item in items:
        parts = [item] if len(names) == 1 and isinstance(target, ast.Name) else item
        if not isinstance(parts, (list, tuple)) or len(parts) != len(names):
            return None
        values = {name: _literal_ast(v) for name, v in zip(names, parts)}
        if any(v is None for v in values.values()):
            return None
        out.extend(_Substitute(values).visit(copy.deepcopy(stmt)) for stmt in loop.body)
    # After the loop its names hold the last item, as Python leaves them.
    last = _literal_ast(items[-1])
    if last is None:
        return None
    out.append(ast.Assign(targets=[copy.deepcopy(target)], value=last, lineno=loop.lineno))
    return [ast.fix_missing_locations(s) for s in out]


def plan_test(source: str, setup_names: set[str] | None, shadowed: frozenset[str] = frozenset()) -> TestPlan:
    """The plan for one test (see TestPlan), from its source and the names the setup binds
    (None: unknown, e.g. a star import, or the setup itself calls the program). `shadowed`:
    builtin names the program redefines (its `sum` is the one under test, not the builtin)."""
    tree = _unroll_literal_loops(ast.parse(source))
    local = _bound_names(tree)
    if setup_names is None or local is None:
        return TestPlan("opaque")
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def ancestors(node):
        p = parents.get(id(node))
        while p is not None:
            yield p
            p = parents.get(id(p))

    # A name the test binds is a plain value the judge holds (`r = add(1, 2)`), unless the
    # test calls it or reads an attribute of it (`s = Stack(); s.push(1)`): then it is one of
    # the program's objects, which only the program's process can use.
    objects = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
               and n.id in local and (isinstance(parents.get(id(n)), ast.Attribute) and parents[id(n)].value is n
                                      or isinstance(parents.get(id(n)), ast.Call) and parents[id(n)].func is n)}
    tops: dict[int, ast.AST] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
            continue
        if node.id in local and node.id not in objects:
            continue
        if node.id in setup_names or (node.id in _BUILTIN_NAMES and node.id not in local | shadowed):
            continue
        top = node   # a program name (or a name the test binds): climb its call chain
        while True:
            p = parents.get(id(top))
            if (isinstance(p, ast.Attribute) and p.value is top or isinstance(p, ast.Call) and p.func is top
                    or isinstance(p, ast.Subscript) and p.value is top):
                top = p
            else:
                break
        tops[id(top)] = top
    expressions = [t for t in tops.values() if not any(id(a) in tops for a in ancestors(t))]
    expressions.sort(key=lambda n: (n.lineno, n.col_offset))
    for e in expressions:
        if any(isinstance(a, _REPEATING) for a in ancestors(e)) or (_free_loads(e) & local) or any(
                isinstance(n, (ast.NamedExpr, ast.Lambda, ast.Await, ast.Yield, ast.YieldFrom,
                               ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)) for n in ast.walk(e)):
            return TestPlan("opaque")
    sources = tuple(ast.unparse(e) for e in expressions)
    body = tree.body
    if len(expressions) == 1 and len(body) == 1 and isinstance(body[0], ast.Assert):
        test, expr = body[0].test, expressions[0]
        if test is expr:
            return TestPlan("compare", sources, op="truthy")
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and test.operand is expr:
            return TestPlan("compare", sources, op="falsy")
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _COMPARE_OPS:
            op = _COMPARE_OPS[type(test.ops[0])][0]
            left, right = test.left, test.comparators[0]
            if left is expr:
                ok, value = _literal(right)
                if ok:
                    return TestPlan("compare", sources, op=op, expected=value)
            elif right is expr:
                ok, value = _literal(left)
                if ok:
                    return TestPlan("compare", sources, op=op, expected=value, literal_left=True)
    judge = _ReplaceExpressions({id(e): k for k, e in enumerate(expressions)}).visit(tree)
    return TestPlan("judged", sources, judge_source=ast.unparse(ast.fix_missing_locations(judge)))


@functools.lru_cache(maxsize=4096)
def _plan_suite(setup: str, tests: tuple[str, ...], shadowed: frozenset[str]) -> tuple[TestPlan, ...]:
    setup_tree = ast.parse(setup)
    names = _bound_names(setup_tree)
    if names is not None and _free_loads(setup_tree) - names - _BUILTIN_NAMES:
        names = None  # the setup uses the program's names: only a run with the program can do it
    return tuple(plan_test(t, names, shadowed) for t in tests)


def shadowed_builtins(program: str) -> frozenset[str]:
    """Builtin names the program binds (a `def sum(...)` under test). Empty when it does not
    parse: it will fail to load anyway."""
    try:
        names = _bound_names(ast.parse(program))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()
    return frozenset((names or set()) & _BUILTIN_NAMES)


def plan_suite(suite: Suite, program: str = "") -> list[TestPlan]:
    """One TestPlan per test of `suite`, for `program` (only the builtin names it redefines
    matter; cached: suites repeat across the K samples of a prompt)."""
    return list(_plan_suite(suite.setup, tuple(suite.tests), shadowed_builtins(program)))


def compare(plan: TestPlan, value: Any) -> bool:
    """A compare plan's verdict on a (decoded, plain) value, in the parent. Raises TypeError
    where Python would (`1 < "a"`): the caller counts that as a failure."""
    if plan.op == "truthy":
        return bool(value)
    if plan.op == "falsy":
        return not value
    fn = _OP_FUNCS[plan.op]
    return bool(fn(plan.expected, value) if plan.literal_left else fn(value, plan.expected))


# ---------------------------------------------------------------------------------------
# The sandbox

@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0          # one sandboxed process: start, program, all its tests
    test_s: float = 3.0           # one test (and loading the program): SIGALRM in the harness
    cpu_s: int = 10               # RLIMIT_CPU, one process
    memory_mb: int = 1024         # RLIMIT_AS
    max_procs: int = 32           # RLIMIT_NPROC (per uid)
    file_mb: int = 16             # RLIMIT_FSIZE, one file
    work_mb: int = 64             # size of the /work tmpfs
    max_output_bytes: int = 64 * 1024
    max_report_bytes: int = 1 << 20


@dataclass
class RunResult:
    passed: list[bool]            # one per test
    loaded: bool                  # the program itself ran without raising
    timed_out: bool
    returncode: int | None
    output: str                   # the program's stdout+stderr, truncated
    errors: list[str] = field(default_factory=list)  # per test: "" or why it failed
    kinds: list[str] = field(default_factory=list)   # per test: its TestPlan kind

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


# The trusted start of every sandboxed process: read the job from stdin, set the limits,
# arm the per-test alarm. Spliced into the body of `_main()` of each harness below. Only
# stdlib. After this, the program may change anything in the process: nothing the process
# reports is taken as a verdict (see the module docstring).
_PRELUDE = r'''
    import sys, os, json, resource, signal, builtins
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)   # fd 0 again, so input() sees EOF, not a bad fd
    fd, lim = job["fd"], job["limits"]
    codec = {"__name__": "plain"}
    exec(job["codec"], codec)
    _write, _dumps, _type, _str = os.write, json.dumps, type, str
    def report(**entry):
        _write(fd, (_dumps(entry) + "\n").encode("utf-8", "replace"))
    for name, value in (("RLIMIT_CPU", lim["cpu_s"]), ("RLIMIT_AS", lim["memory_mb"] << 20),
                        ("RLIMIT_NPROC", lim["max_procs"]), ("RLIMIT_FSIZE", lim["file_mb"] << 20),
                        ("RLIMIT_NOFILE", 256), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    os.chdir(job["cwd"])
    class _Timeout(BaseException):
        pass
    def on_alarm(signum, frame):
        raise _Timeout("time limit")
    signal.signal(signal.SIGALRM, on_alarm)
    def run(source, name, scope):
        signal.setitimer(signal.ITIMER_REAL, lim["test_s"])
        try:
            exec(compile(source, name, "exec"), scope)
            return True, ""
        except BaseException as e:   # the sample's failure, recorded as such
            return False, (_type(e).__name__ + ": " + _str(e))[:300]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
'''

# The program's process: load the program and the test setup, then evaluate each test's
# program expressions and report each value as plain data, its exception, or that it is
# not plain. Nothing here compares anything.
_VALUES_HARNESS = "def _main():" + _PRELUDE + r'''
    encode, NotPlain = codec["encode"], codec["NotPlain"]
    type_name = type.__dict__["__name__"].__get__    # a metaclass cannot fake it
    def outcome(value):
        try:
            return {"v": encode(value)}
        except (NotPlain, ValueError, RecursionError, MemoryError):
            return {"opaque": True}
    def raised(e):
        name = "BaseException"
        for c in _type(e).__mro__:
            n = type_name(c)
            if getattr(builtins, n, None) is c:
                name = n
                break
        args = outcome(e.args)
        return {"raise": name, "args": args.get("v")}
    scope = {"__name__": "solution", "__builtins__": builtins}
    ok, err = run(job["program"], "solution.py", scope)
    if ok and job["setup"]:
        ok, err = run(job["setup"], "test_setup.py", scope)
    report(load=ok, error=err)
    if not ok:
        os._exit(0)
    for i, expressions in enumerate(job["expressions"]):
        k = 0
        signal.setitimer(signal.ITIMER_REAL, lim["test_s"])
        try:
            for k, source in enumerate(expressions):
                try:
                    value = eval(compile(source, "test_%d.py" % i, "eval"), scope)
                except _Timeout:
                    raise
                except BaseException as e:
                    report(t=i, k=k, **raised(e))
                    continue
                report(t=i, k=k, **outcome(value))
        except _Timeout:
            report(t=i, k=k, timeout=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
_main()
'''

# The judge: the test setup and the judged tests, with each program expression replaced by
# its recorded outcome. No program code is ever in this process.
_JUDGE_HARNESS = "def _main():" + _PRELUDE + r'''
    decode = codec["decode"]
    class NotPlain(BaseException):   # not an Exception: a test's `except Exception` must not swallow it
        pass
    def value_function(entries):
        def value(k):
            e = entries.get(str(k))
            if e is None:
                raise NotPlain("the program gave no value for this expression")
            if "v" in e:
                try:
                    return decode(e["v"])
                except (ValueError, TypeError, RecursionError) as err:
                    raise NotPlain("unreadable value: %s" % err)
            if "raise" in e:
                cls = getattr(builtins, str(e["raise"]), None)
                if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                    raise NotPlain("unknown exception %r" % (e["raise"],))
                try:
                    args = decode(e["args"]) if e.get("args") is not None else ()
                    exc = cls(*args) if type(args) is tuple else cls()
                except (ValueError, TypeError, RecursionError):
                    exc = None
                if exc is None:
                    raise NotPlain("the program raised " + cls.__name__)
                raise exc
            if e.get("timeout"):
                raise _Timeout("time limit")
            raise NotPlain("the program returned a value that is not plain data")
        return value
    base = {"__name__": "tests", "__builtins__": builtins}
    ok, err = run(job["setup"], "test_setup.py", base) if job["setup"] else (True, "")
    for test in job["tests"]:
        if not ok:
            report(t=test["t"], ok=False, error="test setup failed: " + err)
            continue
        scope = dict(base)
        scope[job["value_function"]] = value_function(test["values"])
        ok_i, err_i = run(test["source"], "test_%d.py" % test["t"], scope)
        report(t=test["t"], ok=ok_i, error=err_i)
    os._exit(0)
_main()
'''

# An opaque test: program, setup and the test in one fresh interpreter. The verdict is the
# exit status (a random code per run, observed by the parent). The audit hook only makes
# finding that code harder; it is not what the other plans rely on (see the module docstring).
_OPAQUE_HARNESS = "def _main():" + _PRELUDE + r'''
    code = job.pop("exit_code")
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals", "f_globals"}
    def hook(event, args):
        if event == "sys._getframe":
            raise ValueError("frame access is disabled in the sandbox")  # stdlib falls back on ValueError
        if event == "object.__getattr__" and len(args) > 1 and args[1] in frame_attrs:
            raise RuntimeError("frame access is disabled in the sandbox")
        if event in ("sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                     "sys.setprofile", "sys.settrace", "sys.addaudithook") or event.startswith("ctypes."):
            raise RuntimeError(event + " is disabled in the sandbox")
    del sys.settrace, sys.setprofile
    sys.addaudithook(hook)
    scope = {"__name__": "solution", "__builtins__": builtins}
    ok, err = run(job["program"], "solution.py", scope)
    if ok and job["setup"]:
        ok, err = run(job["setup"], "test_setup.py", scope)
    if ok:
        ok, err = run(job["test"], "test.py", scope)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if ok else 1)
_main()
'''

# Runs inside the new namespaces as (namespace) root: builds the chroot, then drops to the
# sandbox uid with no capabilities and execs the interpreter.
_NAMESPACE_SCRIPT = r'''
set -eu
R="$1"; WORK_MB="$2"; UIDG="$3"; shift 3
mount -t tmpfs -o size=8m,mode=755 sandbox-root "$R"
mkdir -p "$R/usr" "$R/work" "$R/dev" "$R/tmp"
mount --rbind /usr "$R/usr"
mount -o remount,bind,ro "$R/usr"
for d in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d"
  elif [ -d "/$d" ]; then mkdir -p "$R/$d"; mount --rbind "/$d" "$R/$d"; mount -o remount,bind,ro "$R/$d"
  fi
done
while [ "$1" != "--" ]; do
  mkdir -p "$R$1"; mount --rbind "$1" "$R$1"; mount -o remount,bind,ro "$R$1"; shift
done
shift
touch "$R/dev/null"; mount --bind /dev/null "$R/dev/null"
mount -t tmpfs -o "size=${WORK_MB}m,mode=700" sandbox-work "$R/work"
if [ "$UIDG" = "keep" ]; then
  exec chroot "$R" setpriv --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@"
fi
chown "$UIDG" "$R/work"
exec chroot "$R" setpriv --reuid="${UIDG%:*}" --regid="${UIDG#*:}" --clear-groups --no-new-privs \
  --inh-caps=-all --bounding-set=-all -- "$@"
'''

_SANDBOX_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
                "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/work"}


@dataclass(frozen=True)
class Interpreter:
    executable: str       # real path of the python binary
    mounts: tuple[str, ...]  # folders (outside /usr) that must be visible in the chroot


def find_interpreter(python: str | None = None) -> Interpreter:
    """The interpreter for sandboxed programs (default: the one running posttrain) and the
    folders it needs. It runs with `-I -S`: no site-packages, so only the stdlib is there."""
    exe = os.path.realpath(python or sys.executable)
    if python is None:
        prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    else:
        out = subprocess.run([exe, "-I", "-S", "-c", "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
                             capture_output=True, text=True, timeout=30, check=True)
        prefixes = {os.path.realpath(p) for p in out.stdout.split()}
    prefixes.add(os.path.dirname(os.path.dirname(exe)))
    mounts = tuple(sorted(p for p in prefixes if not (p == "/usr" or p.startswith("/usr/"))))
    return Interpreter(exe, mounts)


def _drain(proc: subprocess.Popen, report_fd: int, deadline: float, limits: Limits) -> tuple[bytes, bytes, bool]:
    """Read the child's output (capped) and its report pipe until both close or time runs out.
    Beyond the caps, bytes are read and dropped so the child never blocks on a full pipe."""
    out, rep = bytearray(), bytearray()
    fds = {proc.stdout.fileno(): out, report_fd: rep}
    caps = {proc.stdout.fileno(): limits.max_output_bytes, report_fd: limits.max_report_bytes}
    while fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), bytes(rep), True
        ready, _, _ = select.select(list(fds), [], [], left)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                del fds[fd]
                continue
            buf = fds[fd]
            room = caps[fd] - len(buf)
            if room > 0:
                buf += chunk[:room]
    return bytes(out), bytes(rep), False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone



def build_command(mode: str, interp: Interpreter, root_dir: str, limits: Limits, uid: int | None,
                  harness: str) -> list[str]:
    """argv that starts `harness` under `mode` ("namespace" or "userns")."""
    if mode not in ("namespace", "userns"):
        raise ValueError(f"unknown isolation mode {mode!r}")
    python = [interp.executable, "-I", "-S", "-B", "-c", harness]
    ns = ["unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--kill-child", "--propagation", "private"]
    if mode == "userns":
        ns[1:1] = ["--user", "--map-root-user"]
        uidg = "keep"
    else:
        uidg = f"{uid}:{uid}"
    return [*ns, "sh", "-c", _NAMESPACE_SCRIPT, "sandbox", root_dir, str(limits.work_mb), uidg,
            *interp.mounts, "--", *python]


@functools.lru_cache(maxsize=1)
def _codec_source() -> str:
    return Path(_plain.__file__).read_text(encoding="utf-8")


@dataclass
class _Process:
    output: bytes
    report: bytes
    timed_out: bool
    returncode: int | None


def _run_sandboxed(harness: str, job: dict, *, mode: str, interp: Interpreter, limits: Limits,
                   uid: int | None) -> _Process:
    """Run `harness` with `job` in a fresh sandbox; never raises for anything inside it."""
    report_r, report_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="posttrain-code-") as tmp:
        os.mkdir(os.path.join(tmp, "root"))
        job = {**job, "fd": report_w, "cwd": "/work", "codec": _codec_source(),
               "limits": {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "max_procs": limits.max_procs,
                          "file_mb": limits.file_mb, "test_s": limits.test_s}}
        argv = build_command(mode, interp, os.path.join(tmp, "root"), limits, uid, harness)
        deadline = time.monotonic() + limits.wall_s
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    pass_fds=(report_w,), cwd=tmp, env=_SANDBOX_ENV, start_new_session=True)
        finally:
            os.close(report_w)
        try:
            # Written from a thread: a child that never reads stdin must not block us.
            writer = threading.Thread(target=_feed, args=(proc.stdin, json.dumps(job).encode("utf-8")), daemon=True)
            writer.start()
            output, report, timed_out = _drain(proc, report_r, deadline, limits)
            if timed_out:
                _kill_group(proc)
            try:
                returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                returncode = proc.wait()
        finally:
            _kill_group(proc)
            os.close(report_r)
            proc.stdout.close()
    return _Process(output, report, timed_out, returncode)


def _report_lines(report: bytes) -> list[dict]:
    """The JSON objects on a report pipe, one a line (split on \\n only); anything else is
    skipped. The program can write here too: see the module docstring for why that is harmless."""
    entries = []
    for line in report.split(b"\n"):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _outcome_error(entry: dict | None) -> str:
    if entry is None:
        return "no value (the program stopped earlier)"
    if "raise" in entry:
        return f"raised {entry['raise']}"
    if entry.get("timeout"):
        return "time limit"
    return "returned a value that is not plain data (exact int/float/str/bool/None/bytes/list/tuple/dict/set)"


def _decide_compare(plan: TestPlan, entry: dict | None) -> tuple[bool, str]:
    if entry is None or "v" not in entry:
        return False, _outcome_error(entry)
    try:
        value = _plain.decode(entry["v"])
        ok = compare(plan, value)
    except (ValueError, TypeError, RecursionError, MemoryError) as e:
        return False, f"{type(e).__name__}: {e}"[:300]
    return ok, "" if ok else f"AssertionError: got {_short_repr(value)}"


def _short_repr(value: Any) -> str:
    short = reprlib.Repr()
    short.maxstring = short.maxother = 80
    return short.repr(value)


def run_tests(code: str, suite: Suite, *, mode: str, interp: Interpreter, limits: Limits,
              uid: int | None = None) -> RunResult:
    """Run `code` against `suite` (see the module docstring); never raises for anything the
    program does. Up to 2 + (opaque tests) sandboxed processes, one after another."""
    plans = plan_suite(suite, code)
    n = len(plans)
    run = functools.partial(_run_sandboxed, mode=mode, interp=interp, limits=limits, uid=uid)
    values = run(_VALUES_HARNESS, {"program": code, "setup": suite.setup,
                                   "expressions": [list(p.expressions) if p.kind != "opaque" else [] for p in plans]})
    loaded, load_error = False, "the program did not finish loading"
    outcomes: dict[tuple[int, int], dict] = {}
    for entry in _report_lines(values.report):
        if "load" in entry and not outcomes and not loaded:
            loaded, load_error = entry.get("load") is True, str(entry.get("error", ""))[:300]
        elif type(entry.get("t")) is int and type(entry.get("k")) is int:
            outcomes.setdefault((entry["t"], entry["k"]), entry)  # the first claim counts
    passed, errors = [False] * n, ["not run"] * n
    if not loaded:
        errors = [f"program failed: {load_error}"] * n
    else:
        judged = []
        for i, plan in enumerate(plans):
            if plan.kind == "compare":
                passed[i], errors[i] = _decide_compare(plan, outcomes.get((i, 0)))
            elif plan.kind == "judged":
                judged.append({"t": i, "source": plan.judge_source,
                               "values": {str(k): outcomes[(i, k)] for k in range(len(plan.expressions))
                                          if (i, k) in outcomes}})
            else:
                code_ok = secrets.choice(range(3, 120))
                proc = run(_OPAQUE_HARNESS, {"program": code, "setup": suite.setup, "test": suite.tests[i],
                                             "exit_code": code_ok})
                passed[i] = proc.returncode == code_ok and not proc.timed_out
                errors[i] = "" if passed[i] else ("time limit" if proc.timed_out else "failed (run alone)")
        if judged:
            verdicts = run(_JUDGE_HARNESS, {"setup": suite.setup, "tests": judged, "value_function": VALUE_FUNCTION})
            seen = set()
            for entry in _report_lines(verdicts.report):
                t = entry.get("t")
                if type(t) is int and 0 <= t < n and plans[t].kind == "judged" and t not in seen:
                    seen.add(t)
                    passed[t] = entry.get("ok") is True
                    errors[t] = "" if passed[t] else str(entry.get("error", ""))[:300]
            for t in {j["t"] for j in judged} - seen:
                errors[t] = "the judge gave no verdict (time limit)" if verdicts.timed_out else "the judge gave no verdict"
    return RunResult(passed=passed, loaded=loaded, timed_out=values.timed_out, returncode=values.returncode,
                     output=values.output.decode("utf-8", "replace"), errors=errors, kinds=[p.kind for p in plans])


def _feed(stream, payload: bytes) -> None:
    try:
        stream.write(payload)
        stream.close()
    except (BrokenPipeError, ValueError, OSError):
        pass  # the child died before reading its job: it reports nothing, so every test fails


def probe_isolation(mode: str, interp: Interpreter, limits: Limits, uid: int) -> str | None:
    """None when `mode` works here (a real run passes a trivial test), else why not."""
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return "needs the util-linux tools unshare and setpriv"
    if mode == "namespace" and os.geteuid() != 0:
        return "needs root"
    probe = run_tests("x = 41\n", Suite("", ["assert x + 1 == 42"]), mode=mode, interp=interp,
                      limits=Limits(wall_s=max(limits.wall_s, 20.0), test_s=10.0), uid=uid)
    if probe.passed == [True]:
        return None
    return f"probe run failed (exit {probe.returncode}): {probe.output.strip()[-500:]} {probe.errors}"


class CodeTestReward:
    """Fraction of the prompt's unit tests that the response's code passes (see module doc).

    Args (all JSON-able, for recipes):
        prompts_file: JSONL of prompt rows with `tests`, for `score()` (see module doc).
        isolation: "auto" (namespace, else userns; error if neither), "namespace" or "userns".
        opaque_tests: "run" (default: tests that are neither compare nor judged run alone and
            count by exit status, the weaker form) or "reject" (a suite that has one is an error).
        timeout_s: wall-clock limit for one sandboxed process (the program's, the judge's, or
            one opaque test's).
        test_timeout_s: limit for loading the program and for each test.
        cpu_s, memory_mb, max_procs, file_mb, work_mb, max_output_bytes: see `Limits`.
        max_workers: samples run at once.
        python: interpreter for the programs (default: the current one; stdlib only).
        uid_base: first of `max_workers` uids the programs run as (namespace mode).
    """

    name = "code_tests"

    def __init__(self, prompts_file: str | None = None, isolation: str = "auto", timeout_s: float = 10.0,
                 test_timeout_s: float = 3.0, cpu_s: int = 10, memory_mb: int = 1024, max_procs: int = 32,
                 file_mb: int = 16, work_mb: int = 64, max_output_bytes: int = 65536, max_workers: int = 2,
                 python: str | None = None, uid_base: int = 1_990_000_000, opaque_tests: str = "run"):
        if isolation == "process":
            raise ValueError("CodeTestReward: isolation='process' was removed: it ran programs without OS "
                             "isolation (as root, one could start a shell on the host); use 'auto'")
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"CodeTestReward: isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        if opaque_tests not in ("run", "reject"):
            raise ValueError(f"CodeTestReward: opaque_tests must be 'run' or 'reject', got {opaque_tests!r}")
        if max_workers < 1:
            raise ValueError(f"CodeTestReward: max_workers must be >= 1, got {max_workers}")
        if not 0 < test_timeout_s <= timeout_s:
            raise ValueError("CodeTestReward: need 0 < test_timeout_s <= timeout_s")
        self.requested_isolation = isolation
        self.limits = Limits(wall_s=timeout_s, test_s=test_timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                             max_procs=max_procs, file_mb=file_mb, work_mb=work_mb,
                             max_output_bytes=max_output_bytes)
        self.max_workers = max_workers
        self.python = python
        self.uid_base = uid_base
        self.opaque_tests = opaque_tests
        self.references = ReferenceIndex(prompts_file, ["tests"]) if prompts_file else None
        if self.references is not None:  # bad tests fail here, naming the row, not mid-sampling
            for key, meta in self.references._metas.items():
                if meta.get("tests") not in (None, [], ""):
                    self._suite(meta["tests"], f"{prompts_file}: row {self.references._rows[key]}: field 'tests'")
        self.isolation: str | None = None   # the mode in use, set by setup()
        self.interpreter: Interpreter | None = None
        self._slots: queue.Queue[int] | None = None

    def setup(self) -> None:
        """Pick and probe the isolation mode; raises when the requested one does not work."""
        if self.isolation is not None:
            return
        interp = find_interpreter(self.python)
        candidates = ["namespace", "userns"] if self.requested_isolation == "auto" else [self.requested_isolation]
        reasons = []
        for mode in candidates:
            why = probe_isolation(mode, interp, self.limits, self.uid_base)
            if why is None:
                self.isolation, self.interpreter = mode, interp
                break
            reasons.append(f"{mode}: {why}")
        else:
            raise RuntimeError("CodeTestReward: no working sandbox (" + "; ".join(reasons) + "); "
                               "it needs root (namespace) or unprivileged user namespaces (userns)")
        self._slots = queue.Queue()
        for i in range(self.max_workers):
            self._slots.put(self.uid_base + i)
        log.info("CodeTestReward: isolation=%s interpreter=%s", self.isolation, interp.executable)

    def teardown(self) -> None:
        pass  # nothing outlives a run: every sandbox is torn down when its sample finishes

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]:
        if self.references is None:
            raise ValueError("CodeTestReward.score needs prompts_file= (prompt rows with `tests`); "
                             "or call score_with_meta(prompts, responses, metas)")
        return self.score_with_meta(prompts, responses, [self.references.meta_for(p) for p in prompts])

    def score_with_meta(self, prompts: list[list[Message]], responses: list[str],
                        metas: list[dict]) -> list[float | None]:
        if not len(prompts) == len(responses) == len(metas):
            raise ValueError(f"CodeTestReward: {len(prompts)} prompts, {len(responses)} responses, {len(metas)} metas")
        suites: list[Suite | None] = []
        for i, meta in enumerate(metas):
            tests = (meta or {}).get("tests")
            suites.append(None if tests in (None, [], "") else self._suite(tests, f"sample {i}: field 'tests'"))
        return [None if r is None else r.fraction for r in self.run_batch(responses, suites)]

    def _suite(self, tests: Any, where: str) -> Suite:
        suite = parse_tests(tests, where=where)
        if self.opaque_tests == "reject":
            opaque = [i for i, p in enumerate(plan_suite(suite)) if p.kind == "opaque"]
            if opaque:
                raise ValueError(f"{where}: test(s) {opaque} can only be judged inside the program's own "
                                 "process (opaque_tests='reject'); write them as `assert f(...) == <literal>` "
                                 "or keep calls to the program out of loops and test-local variables")
        return suite

    def run_batch(self, responses: list[str], suites: list[Suite | None]) -> list[RunResult | None]:
        """Run each response against its suite (None: skipped), `max_workers` at a time."""
        self.setup()
        assert self._slots is not None and self.interpreter is not None

        def one(i: int) -> RunResult | None:
            if suites[i] is None:
                return None
            uid = self._slots.get()
            try:
                return run_tests(extract_code(responses[i]), suites[i], mode=self.isolation,
                                 interp=self.interpreter, limits=self.limits, uid=uid)
            finally:
                self._slots.put(uid)

        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="code-reward") as pool:
            return list(pool.map(one, range(len(responses))))


__all__ = ["CodeTestReward", "Limits", "ReferenceIndex", "RunResult", "Suite", "TestPlan", "extract_code",
           "find_interpreter", "parse_tests", "plan_suite", "plan_test", "prompt_key", "run_tests"]
