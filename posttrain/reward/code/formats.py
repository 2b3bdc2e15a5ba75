"""The program in a response, and the test forms of real datasets, read from a prompt row.

Four forms, each from the row's own fields (they arrive in `Prompt.meta`); a row has exactly
one of them, and no test fields at all means the reward abstains:

    asserts    tests: ["assert add(1, 2) == 3", ...]   (or one source string: its top-level
               asserts are the tests, every other statement shared setup)
    HumanEval  test: "def check(candidate): ...", entry_point: "add"   one test: check(add)
    MBPP       test_list: ["assert add(1, 2) == 3", ...], test_setup_code: "" (optional)
    stdin      inputs: ["1 2\\n", ...], outputs: ["3\\n", ...]   the program run as a script

`suite_from_meta` turns a row's fields into a `Suite` (raising ValueError naming the field);
`row_problems` lists every problem of a row as (field, message), for `validate-data`.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------------------ the program

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def extract_code(response: str) -> str:
    """The program in a response: the last ```python block, else the last fenced block,
    else the whole response (a model may answer with bare code). The last block because
    models usually show a sketch first and the final program last."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    python_blocks = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return response


# ------------------------------------------------------------------------------ suites

COMPARE_FUNCTION = "__posttrain_assert__"   # what a rewritten `assert a == b` calls in the judge


@dataclass(frozen=True)
class Suite:
    """What one prompt's program is tested against.

    Calls form (`inputs is None`): `setup` runs in the judge before the tests; each item of
    `tests` is one test, passed when it runs without raising. `program_names`: names the tests
    take from the program even when they are builtins (HumanEval's entry point).
    Stdin form: the program runs once per item of `inputs`; its stdout must match `outputs`.
    """
    setup: str = ""
    tests: list[str] = field(default_factory=list)
    program_names: tuple[str, ...] = ()
    inputs: list[str] | None = None
    outputs: list[str] | None = None

    @property
    def mode(self) -> str:
        return "stdio" if self.inputs is not None else "calls"

    def __len__(self) -> int:
        return len(self.inputs) if self.inputs is not None else len(self.tests)


def parse_tests(tests: Any, where: str = "tests") -> Suite:
    """A suite from a prompt's `tests`: a list of snippets (one test each), or one source
    string whose top-level `assert`s are the tests and whose other statements are setup."""
    if isinstance(tests, list):
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ValueError(f"{where}: expected a non-empty list of test source strings")
        for i, t in enumerate(tests):
            _parse(t, f"{where}[{i}]")
        return Suite(setup="", tests=list(tests))
    if isinstance(tests, str):
        tree = _parse(tests, where)
        setup = [ast.unparse(n) for n in tree.body if not isinstance(n, ast.Assert)]
        asserts = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Assert)]
        if not asserts:
            raise ValueError(f"{where}: the test source has no top-level assert statement "
                             "(a HumanEval-style `def check(candidate)` goes in `test`, with `entry_point`)")
        return Suite(setup="\n".join(setup), tests=asserts)
    raise ValueError(f"{where}: expected a list of test strings or one test source string, "
                     f"got {type(tests).__name__}")


def _parse(source: str, where: str) -> ast.Module:
    try:
        return ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"{where}: not valid Python: {e}") from e
    except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes, absurd nesting
        raise ValueError(f"{where}: not valid Python: {type(e).__name__}") from e


def _str_list(value: Any, where: str, what: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of {what}, got "
                         f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"{where}[{i}]: expected a string, got {type(item).__name__}")
    return value


# field -> the form it belongs to
FORM_FIELDS = {"tests": "asserts", "test": "humaneval", "entry_point": "humaneval", "test_list": "mbpp",
               "test_setup_code": "mbpp", "inputs": "stdin", "outputs": "stdin"}


def suite_from_meta(meta: dict | None, where: str = "row") -> Suite | None:
    """The suite a prompt row's fields describe (see the module docstring); None when the row
    has no test fields (or `tests` is empty: the reward abstains). ValueError names the field."""
    meta = meta or {}
    present = [k for k in FORM_FIELDS if k in meta and meta[k] is not None]
    forms = sorted({FORM_FIELDS[k] for k in present})
    if len(forms) > 1:
        raise ValueError(f"{where}: fields {present} mix test forms ({', '.join(forms)}): give one form per row")
    if not forms or forms == ["asserts"] and meta["tests"] in ([], ""):
        return None
    form = forms[0]
    if form == "asserts":
        return parse_tests(meta["tests"], f"{where}: field 'tests'")
    if form == "humaneval":
        for key in ("test", "entry_point"):
            if not isinstance(meta.get(key), str) or not meta[key].strip():
                raise ValueError(f"{where}: field '{key}': expected a non-empty string (HumanEval form: "
                                 "`test` holds `def check(candidate)`, `entry_point` the function's name)")
        entry = meta["entry_point"].strip()
        if not entry.isidentifier():
            raise ValueError(f"{where}: field 'entry_point': {entry!r} is not a Python name")
        tree = _parse(meta["test"], f"{where}: field 'test'")
        if not any(isinstance(n, ast.FunctionDef) and n.name == "check" and n.args.args for n in tree.body):
            raise ValueError(f"{where}: field 'test': no top-level `def check(candidate):`")
        return Suite(setup=meta["test"], tests=[f"check({entry})"], program_names=(entry,))
    if form == "mbpp":
        tests = _str_list(meta.get("test_list"), f"{where}: field 'test_list'", "assert strings")
        for i, t in enumerate(tests):
            _parse(t, f"{where}: field 'test_list'[{i}]")
        setup = meta.get("test_setup_code", "")
        if setup is None:
            setup = ""
        if not isinstance(setup, str):
            raise ValueError(f"{where}: field 'test_setup_code': expected a string, got {type(setup).__name__}")
        _parse(setup, f"{where}: field 'test_setup_code'")
        return Suite(setup=setup, tests=list(tests))
    inputs = _str_list(meta.get("inputs"), f"{where}: field 'inputs'", "stdin strings")
    outputs = _str_list(meta.get("outputs"), f"{where}: field 'outputs'", "expected stdout strings")
    if len(inputs) != len(outputs):
        raise ValueError(f"{where}: field 'outputs': {len(outputs)} outputs for {len(inputs)} inputs")
    return Suite(inputs=list(inputs), outputs=list(outputs))


def row_problems(meta: dict) -> list[tuple[str, str]]:
    """(field, message) for each problem of a prompt row's test fields; [] when fine."""
    try:
        suite_from_meta(meta, "row")
    except ValueError as e:
        text = str(e).removeprefix("row: ")
        m = re.match(r"field '(\w+)'(\[\d+\])?: (.*)", text, re.DOTALL)
        if m:
            return [(m.group(1) + (m.group(2) or ""), m.group(3))]
        key = next((k for k in FORM_FIELDS if k in meta), "tests")
        return [(key, text)]
    return []


def normalise_output(text: str) -> str:
    """Stdout as compared: \\r\\n and \\r become \\n, each line loses its trailing whitespace,
    and trailing blank lines are dropped. Everything else (leading spaces, inner blank
    lines, letter case) must match exactly."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


# ------------------------------------------------------------------------------ for the judge

_BUILTIN_NAMES = frozenset(dir(builtins))


def bound_names(tree: ast.AST) -> set[str]:
    """Every name `tree` binds anywhere (assignment, def, import, argument, except, ...)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
    return names


def free_names(suite: Suite) -> tuple[list[str], list[str]]:
    """(program names, modules): the names the tests read that neither they nor the builtins
    define. Standard-library module names (`math` in MBPP's `assert math.isclose(...)`, which
    relies on the program's import) the judge imports itself; the rest it asks the program
    for. Builtins stay the judge's own, so a program's `abs` or `math` never judges."""
    trees = [ast.parse(suite.setup)] + [ast.parse(t) for t in suite.tests]
    bound = set().union(*(bound_names(t) for t in trees))
    loads = {n.id for t in trees for n in ast.walk(t) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    free = (loads - bound - _BUILTIN_NAMES) | set(suite.program_names)
    modules = {n for n in free if n in sys.stdlib_module_names and n not in suite.program_names}
    return sorted(free - modules), sorted(modules)


class _Explain(ast.NodeTransformer):
    """`assert a <op> b` (one comparison, no message) -> `__posttrain_assert__(a, "Op", b)`,
    which compares once and raises AssertionError("got <a>"): a failure says what the
    program gave."""

    def visit_Assert(self, node: ast.Assert):
        self.generic_visit(node)
        test = node.test
        if node.msg is None and isinstance(test, ast.Compare) and len(test.ops) == 1:
            call = ast.Call(ast.Name(COMPARE_FUNCTION, ast.Load()),
                            [test.left, ast.Constant(type(test.ops[0]).__name__), test.comparators[0]], [])
            return ast.copy_location(ast.Expr(ast.copy_location(call, node)), node)
        return node


def explained(source: str) -> str:
    """`source` with its comparison asserts rewritten by `_Explain` (same verdicts)."""
    return ast.unparse(ast.fix_missing_locations(_Explain().visit(ast.parse(source))))
