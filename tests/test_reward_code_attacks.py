"""Attacks on the code reward's verdict: each response defines a wrong `add` (it returns 0, or
worse) and tries to score more than that wrong program honestly scores.

The honest score of `def add(a, b): return 0` on TESTS is 0.5 (it passes `add(-1, 1) == 0`).
Every attack must score at most that. The first four are the ones that scored 1.0 before the
verdict moved out of the program's process (issue 15); the rest are our own.
"""

import pytest

from posttrain.reward.code import CodeTestReward, Suite, plan_suite

UID_BASE = 1_990_200_000
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
# The same checks written in the forms that need the judge, and the one that runs alone.
JUDGED = ["assert abs(add(1, 2) - 3) < 1e-9", "r = add(-1, 1)\nassert r == 0"]
OPAQUE_FORM = ["for a in range(1, 2):\n    assert add(a, 2) == 3"]
WRONG = "def add(a, b):\n    return 0\n"
HONEST = 0.5


@pytest.fixture(scope="module")
def reward():
    r = CodeTestReward(timeout_s=4.0, test_timeout_s=1.0, cpu_s=4, memory_mb=512, max_procs=16,
                       max_output_bytes=4096, max_workers=2, uid_base=UID_BASE)
    try:
        r.setup()
    except RuntimeError as e:
        pytest.skip(f"no OS sandbox on this machine: {e}")
    return r


def score(reward, code: str, tests=TESTS) -> float:
    return reward.score_with_meta([[{"role": "user", "content": "q"}]], [f"```python\n{code}\n```"],
                                  [{"tests": tests}])[0]


def test_the_plans_are_what_the_attacks_assume():
    assert [p.kind for p in plan_suite(Suite("", TESTS))] == ["compare", "compare"]
    assert [p.kind for p in plan_suite(Suite("", JUDGED))] == ["judged", "judged"]
    assert [p.kind for p in plan_suite(Suite("", OPAQUE_FORM))] == ["opaque"]
    # the expected value never reaches the sandbox: only the program expression does
    assert plan_suite(Suite("", TESTS))[0].expressions == ("add(1, 2)",)


def test_honest_scores(reward):
    assert score(reward, WRONG) == HONEST
    assert score(reward, WRONG, JUDGED) == HONEST
    assert score(reward, "def add(a, b):\n    return a + b\n") == 1.0
    assert score(reward, "def add(a, b):\n    return a + b\n", JUDGED) == 1.0


ATTACKS = {
    # --- issue 15 ---
    "replace builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\n" + WRONG,
    "replace builtins.compile":
        "import builtins\n_c = compile\nbuiltins.compile = lambda s, n, m, *a, **k: _c('None', n, m)\n" + WRONG,
    "forge the channel from a signal handler's frames": """
import signal, os, json
def forge(sig, frame):
    f = frame
    while f is not None:
        loc = f.f_locals
        if 'fd' in loc and 'job' in loc:
            for i in range(8):
                for k in range(4):
                    for v in (True, 1, 0, {"int": "1"}):
                        os.write(loc['fd'], (json.dumps({"t": i, "k": k, "v": v}) + "\\n").encode())
                os.write(loc['fd'], (json.dumps({"t": i, "ok": True, "error": ""}) + "\\n").encode())
                os.write(loc['fd'], ("%s %d 1 \\n" % (loc['job'].get('nonce', ''), i)).encode())
        f = f.f_back
signal.signal(signal.SIGUSR1, forge)
def add(a, b):
    signal.raise_signal(signal.SIGUSR1)
    return 0
""",
    "always-equal object": """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __lt__(self, other): return True
    __le__ = __gt__ = __ge__ = __lt__
    def __bool__(self): return True
    def __sub__(self, other): return 0.0
    __rsub__ = __add__ = __radd__ = __sub__
    def __abs__(self): return 0.0
    def __hash__(self): return 0
def add(a, b):
    return Anything()
""",
    # --- our own ---
    "int subclass whose __eq__ lies": """
class Int(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = int.__hash__
def add(a, b):
    return Int(0)
""",
    "str subclass": "class S(str):\n    def __eq__(self, o): return True\n    __hash__ = str.__hash__\ndef add(a, b):\n    return S('0')\n",
    "list holding an always-equal object":
        "class A:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return [A()]\n",
    "os._exit(0) at load": "import os\nos._exit(0)\n" + WRONG,
    "sys.exit(0) at load": "import sys\n" + WRONG + "sys.exit(0)\n",
    "os._exit(0) inside the call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "SystemExit(0) from __del__": """
class Bomb:
    def __del__(self):
        raise SystemExit(0)
def add(a, b):
    Bomb()
    return 0
""",
    "print forged results": """
import sys, json
for i in range(4):
    print(json.dumps({"t": i, "k": 0, "v": True}))
    print(json.dumps({"t": i, "ok": True}))
    print("%032d %d 1 " % (0, i))
print("2 passed")
sys.stdout.flush()
""" + WRONG,
    "write forged lines to every fd": """
import os, json
for fd in range(0, 256):
    for i in range(4):
        for line in (json.dumps({"t": i, "k": 0, "v": True}), json.dumps({"t": i, "ok": True}),
                     json.dumps({"load": True})):
            try:
                os.write(fd, (line + "\\n").encode())
            except OSError:
                pass
""" + WRONG,
    "monkeypatch json in the harness": """
import json
json.dumps = lambda *a, **k: '{"t": 0, "k": 0, "v": true}'
json.loads = lambda *a, **k: {"ok": True}
""" + WRONG,
    "monkeypatch type and isinstance": """
import builtins
builtins.type = lambda *a: int
builtins.isinstance = lambda *a: True
class A:
    def __eq__(self, o): return True
def add(a, b):
    return A()
""",
    "a file named like a stdlib module in the working folder":
        "open('json.py', 'w').write('raise SystemExit(0)')\nopen('sitecustomize.py', 'w').write('x')\n" + WRONG,
    "ignore the alarm and loop in the call": """
import signal
signal.signal(signal.SIGALRM, signal.SIG_IGN)
def add(a, b):
    if a == 1:
        while True:
            pass
    return 0
""",
    "catch the harness's timeout and keep going":
        "def add(a, b):\n    while True:\n        try:\n            while True:\n                pass\n        except BaseException:\n            pass\n",
    "a value too big to serialise": "def add(a, b):\n    return 10 ** 100000 if a == 1 else 0\n",
    "a value nested too deep": "def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x if a == 1 else 0\n",
    "a self-referencing list": "def add(a, b):\n    x = []\n    x.append(x)\n    return x if a == 1 else 0\n",
    "an exception whose class lies about its name": """
class Meta(type):
    @property
    def __name__(cls): return 'ZeroDivisionError'
class E(Exception, metaclass=Meta):
    pass
def add(a, b):
    if a == 1:
        raise E()
    return 0
""",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_scores_at_most_the_honest_score(reward, name):
    code = ATTACKS[name]
    assert score(reward, code) <= HONEST, name
    assert score(reward, code, JUDGED) <= HONEST, name


def test_judge_holds_no_program_code(reward):
    """A judged test's verdict comes from a process without the program: patching builtins
    or `AssertionError` in the program's process changes nothing."""
    code = "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = None\n" + WRONG
    assert score(reward, code, JUDGED) == HONEST


def test_recorded_exceptions_reach_the_judge(reward):
    tests = ["try:\n    add('a', 1)\nexcept TypeError:\n    pass\nelse:\n    assert False", "assert add(2, 2) == 4"]
    assert score(reward, "def add(a, b):\n    return a + b\n", tests) == 1.0
    # a custom exception class counts as its nearest builtin base
    assert score(reward, "class Bad(TypeError):\n    pass\ndef add(a, b):\n    raise Bad()\n", tests) == 0.5
    assert score(reward, "def add(a, b):\n    return 0\n", tests) == 0.0


def test_plain_values_compare_as_python_does(reward):
    code = "def add(a, b):\n    return {'a': (1, 2.0), 'b': [None, True, b'x', 'x\\u2028y', {1, 2}], 'n': float('nan')}"
    tests = ["assert add(0, 0)['a'] == (1, 2)", "assert add(0, 0)['b'] == [None, 1, b'x', 'x\\u2028y', {2, 1}]",
             "assert add(0, 0)['a'] != [1, 2]", "assert add(0, 0)['n'] != add(0, 0)['n']"]
    assert score(reward, code, tests) == 1.0


def test_a_builtin_name_the_program_redefines_is_the_programs(reward):
    tests = ["assert sum([1, 2]) == 30", "assert max(1, 2) == 2"]
    assert score(reward, "def sum(xs):\n    return 10 * (xs[0] + xs[1])\n", tests) == 1.0
    assert score(reward, "def sum(xs):\n    return 0\n", tests) == 0.5


def test_loops_over_literal_cases_are_unrolled_into_the_safe_forms(reward):
    loop = ["for a, b, want in [(1, 2, 3), (-1, 1, 0)]:\n    assert add(a, b) == want"]
    assert [p.kind for p in plan_suite(Suite("", loop))] == ["judged"]
    assert plan_suite(Suite("", loop))[0].expressions == ("add(1, 2)", "add(-1, 1)")
    assert score(reward, "def add(a, b):\n    return a + b\n", loop) == 1.0
    assert score(reward, ATTACKS["always-equal object"], loop) == 0.0
    assert score(reward, ATTACKS["replace builtins.exec"], loop) == 0.0  # fails at add(1, 2) like WRONG


def test_opaque_form_still_counts_by_exit_status(reward):
    """The weaker form: run alone, counted by a random exit status. Exiting 0 early does not pass it."""
    assert score(reward, "def add(a, b):\n    return a + b\n", OPAQUE_FORM) == 1.0
    assert score(reward, WRONG, OPAQUE_FORM) == 0.0
    assert score(reward, "import os\ndef add(a, b):\n    os._exit(0)\n", OPAQUE_FORM) == 0.0
    assert score(reward, "import sys\ndef add(a, b):\n    sys.exit(0)\n", OPAQUE_FORM) == 0.0


def test_opaque_tests_can_be_refused():
    with pytest.raises(ValueError, match=r"sample 0: field 'tests': test\(s\) \[1\]"):
        CodeTestReward(opaque_tests="reject").score_with_meta(
            [[{"role": "user", "content": "q"}]], ["x"], [{"tests": TESTS[:1] + OPAQUE_FORM}])
