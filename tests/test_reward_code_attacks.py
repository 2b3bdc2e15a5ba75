"""Attacks on the code reward's verdict, in every test form: each response is a wrong program
that tries to score more than that wrong program honestly scores; a correct one still scores 1.0.

Function forms (top-level asserts, MBPP, HumanEval's check): the wrong `add` returns 0, which
honestly passes `add(-1, 1) == 0` only (0.5 on two asserts; 0.0 on HumanEval's all-or-nothing
check). Object form: a counter whose `value()` is stuck at 0 (0.5). Stdin form: a script that
always prints 3 (0.5). The first four function attacks scored 1.0 when tests ran inside the
program's process (issues 15 and 24); the rest are our own.
"""

import pytest

from posttrain.reward.code import CodeTestReward

UID_BASE = 1_990_200_000
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
# Each function form, as a prompt row's fields, with the wrong program's honest score.
FORMS = {
    "asserts": ({"tests": TESTS}, 0.5),
    "asserts, judged in the test": ({"tests": ["assert abs(add(1, 2) - 3) < 1e-9", "r = add(-1, 1)\nassert r == 0"]}, 0.5),
    "mbpp": ({"test_list": TESTS, "test_setup_code": "import math"}, 0.5),
    "humaneval": ({"test": "METADATA = {}\n\ndef check(candidate):\n    assert candidate(-1, 1) == 0\n"
                           "    assert candidate(1, 2) == 3\n", "entry_point": "add"}, 0.0),
}
WRONG = "def add(a, b):\n    return 0\n"
RIGHT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def reward():
    r = CodeTestReward(timeout_s=4.0, test_timeout_s=1.0, cpu_s=4, memory_mb=512, max_procs=16,
                       max_output_bytes=4096, max_workers=2, uid_base=UID_BASE)
    try:
        r.setup()
    except RuntimeError as e:
        pytest.skip(f"no OS sandbox on this machine: {e}")
    yield r
    r.teardown()


def run(reward, code: str, meta: dict):
    return reward.score_with_meta([[{"role": "user", "content": "q"}]], [f"```python\n{code}\n```"], [meta])[0]


def score(reward, code: str, meta=None) -> float:
    return run(reward, code, meta or {"tests": TESTS}).value


@pytest.mark.parametrize("form", sorted(FORMS))
def test_honest_scores(reward, form):
    meta, honest = FORMS[form]
    assert score(reward, WRONG, meta) == honest
    assert score(reward, RIGHT, meta) == 1.0


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
    for form, (meta, honest) in FORMS.items():
        assert score(reward, ATTACKS[name], meta) <= honest, (name, form)


def test_judge_holds_no_program_code(reward):
    """Patching builtins or `AssertionError` in the program's process changes nothing in the judge."""
    code = "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = None\n" + WRONG
    for meta, honest in FORMS.values():
        assert score(reward, code, meta) == honest


def test_recorded_exceptions_reach_the_judge(reward):
    tests = ["try:\n    add('a', 1)\nexcept TypeError:\n    pass\nelse:\n    assert False", "assert add(2, 2) == 4"]
    assert score(reward, RIGHT, {"tests": tests}) == 1.0
    # a custom exception class counts as its nearest builtin base
    assert score(reward, "class Bad(TypeError):\n    pass\ndef add(a, b):\n    raise Bad()\n", {"tests": tests}) == 0.5
    assert score(reward, WRONG, {"tests": tests}) == 0.0


def test_plain_values_compare_as_python_does(reward):
    code = "def add(a, b):\n    return {'a': (1, 2.0), 'b': [None, True, b'x', 'x\\u2028y', {1, 2}], 'n': float('nan')}"
    tests = ["assert add(0, 0)['a'] == (1, 2)", "assert add(0, 0)['b'] == [None, 1, b'x', 'x\\u2028y', {2, 1}]",
             "assert add(0, 0)['a'] != [1, 2]", "assert add(0, 0)['n'] != add(0, 0)['n']"]
    assert score(reward, code, {"tests": tests}) == 1.0


def test_builtin_names_stay_the_judges(reward):
    """A program's `abs`, `len` or `sorted` is not what the test calls: builtins are the judge's."""
    code = "def abs(x):\n    return 0\ndef len(x):\n    return 2\ndef sorted(x):\n    return [1, 2]\n" + WRONG
    tests = ["assert abs(add(1, 2) - 3) < 1e-9", "assert len(str(add(10, 10))) == 2", "assert sorted([add(1, 1)]) == [2]"]
    assert score(reward, code, {"tests": tests}) == 0.0
    assert score(reward, RIGHT, {"tests": tests}) == 1.0


def test_modules_the_test_relies_on_are_the_judges(reward):
    """MBPP's tests use `math.isclose` relying on the program's `import math`: a program that
    binds its own `math` does not get to answer for the standard library."""
    tests = {"test_list": ["assert math.isclose(add(1, 2), 3)", "assert math.isclose(add(-1, 1), 0)"]}
    fake = "class math:\n    @staticmethod\n    def isclose(*a, **k):\n        return True\n" + WRONG
    assert score(reward, fake, tests) == 0.5
    assert score(reward, "import math\n" + RIGHT, tests) == 1.0


def test_the_sandbox_refuses_what_the_attacks_would_need(reward):
    """No process the program can reach holds the judge: ptrace, signals and /proc all fail."""
    code = """
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
ATTACHED = sum(libc.ptrace(16, pid, 0, 0) == 0 for pid in range(1, 200) if pid != os.getpid())
STOPPED = 0
for pid in range(1, 200):
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGSTOP)
            STOPPED += 1
        except OSError:
            pass
PROC = os.path.exists('/proc/1') or os.path.exists('/judge/x') or os.access('/judge', os.R_OK)
""" + RIGHT
    assert score(reward, code, {"tests": ["assert ATTACHED == 0", "assert STOPPED == 0", "assert not PROC",
                                          "assert add(1, 2) == 3"]}) == 1.0


# --- the object form: a test that builds the program's objects and calls their methods ---------

OBJECT_TESTS = ["c = Counter()\nc.incr()\nc.incr()\nassert c.value() == 2",
                "c = Counter()\nassert c.value() == 0 and len(c.history()) == 0"]
COUNTER = """
class Counter:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
    def history(self):
        return list(range(self.n))
    def value(self):
        return {value}
"""
OBJECT_ATTACKS = {
    "always-equal value": "class A:\n    def __eq__(self, o): return True\n    __hash__ = None\n" + COUNTER.format(value="A()"),
    "the object itself is always equal": COUNTER.format(value="self") + "    def __eq__(self, o): return True\n",
    "bool subclass of int": "class I(int):\n    def __eq__(self, o): return True\n" + COUNTER.format(value="I(0)"),
    "a value whose __bool__ lies, asserted alone": COUNTER.format(value="self")
        + "    def __bool__(self): return True\n    def __len__(self): return 0\n",
    "exit the server after each answer": "import os, threading\n" + COUNTER.format(value="0")
        + "    def __del__(self): os._exit(0)\n",
    "SystemExit from a method": COUNTER.format(value="(_ for _ in ()).throw(SystemExit(0))"),
    "walk the frames for the expected value": """
import sys
class Counter:
    def __init__(self):
        pass
    def incr(self):
        pass
    def history(self):
        return []
    def value(self):
        f, seen = sys._getframe(), []
        while f is not None:
            seen += [v for v in f.f_locals.values() if type(v) is int]
            f = f.f_back
        return max(seen, default=0) if seen else 0
""",
}


def test_object_form_honest_scores(reward):
    assert score(reward, COUNTER.format(value="self.n"), {"tests": OBJECT_TESTS}) == 1.0
    assert score(reward, COUNTER.format(value="0"), {"tests": OBJECT_TESTS}) == 0.5


@pytest.mark.parametrize("name", sorted(OBJECT_ATTACKS))
def test_object_attack_scores_at_most_the_honest_score(reward, name):
    tests = OBJECT_TESTS + ["c = Counter()\nassert c.value()"]   # honestly false: 0 is falsy
    assert score(reward, OBJECT_ATTACKS[name], {"tests": tests}) <= 1 / 3, name


def test_program_objects_are_never_compared(reward):
    got = run(reward, OBJECT_ATTACKS["the object itself is always equal"], {"tests": OBJECT_TESTS})
    assert got.value == 0.0 and "not plain data" in got.detail


# --- the stdin form: the program run as a script, its stdout compared by the parent -------------

STDIN = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
STDIN_WRONG = "input()\nprint(3)\n"
STDIN_RIGHT = "a, b = map(int, input().split())\nprint(a + b)\n"
STDIN_ATTACKS = {
    "forge report lines on every fd": """
import os, json
for fd in range(256):
    for k in range(4):
        try:
            os.write(fd, (json.dumps({"case": k, "exit": 0, "out": "7\\n", "timeout": False, "flood": False}) + "\\n").encode())
        except OSError:
            pass
print(3)
""",
    "right output, then a crash": STDIN_RIGHT + "raise RuntimeError('after the output')\n",
    "right output, then SIGKILL itself": "import os, signal\n" + STDIN_RIGHT + "os.kill(os.getpid(), signal.SIGKILL)\n",
    "right output, then fake a clean exit through excepthook": "import sys\nsys.excepthook = lambda *a: None\n"
        + STDIN_RIGHT + "raise ValueError\n",
    "kill and stop every other process": "import os, signal\nfor pid in range(1, 300):\n    for s in (signal.SIGSTOP, signal.SIGKILL):\n"
        "        try:\n            os.kill(pid, s) if pid != os.getpid() else None\n        except OSError:\n            pass\n" + STDIN_WRONG,
    "a daemon that prints the second answer later": "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
        "    time.sleep(0.2)\n    print(7, flush=True)\n    os._exit(0)\n" + STDIN_WRONG,
    "flood, then the right answer": "import sys\nsys.stdout.write('x' * 100000 + '\\n')\n" + STDIN_RIGHT,
    "leave the answer for the next case in a file": """
import os
a, b = map(int, input().split())
if os.path.exists('seen'):
    print(3)
else:
    open('seen', 'w').write('1')
    print(a + b if a == 1 else 3)
""",
    "ignore the alarm and hang on the second case": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "a, b = map(int, input().split())\nwhile a == 3:\n    pass\nprint(3)\n",
}


def test_stdin_form_honest_scores(reward):
    assert score(reward, STDIN_RIGHT, STDIN) == 1.0
    assert score(reward, STDIN_WRONG, STDIN) == 0.5


@pytest.mark.parametrize("name", sorted(STDIN_ATTACKS))
def test_stdin_attack_scores_at_most_the_honest_score(reward, name):
    assert score(reward, STDIN_ATTACKS[name], STDIN) <= 0.5, name


# --- more attacks on the judge's channel --------------------------------------------------------

def test_forged_answers_on_the_program_channel(reward):
    """The program owns its end of the channel and may write anything on it, ahead of time too:
    what it writes is only a claim about values, never a verdict."""
    code = """
import os, json
for fd in range(3, 64):
    for seq in range(0, 16):
        for msg in ({"seq": seq, "load": True}, {"seq": seq, "found": {}}, {"seq": seq, "v": True},
                    {"seq": seq, "t": 0, "ok": True}):
            try:
                os.write(fd, (json.dumps(msg) + "\\n").encode())
            except OSError:
                pass
""" + WRONG
    for meta, honest in FORMS.values():
        assert score(reward, code, meta) <= honest


def test_answer_floods_and_huge_values_fail(reward):
    flood = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x' * (1 << 20))\n    except OSError:\n        pass\n" + WRONG
    assert score(reward, flood) <= 0.5
    huge = "def add(a, b):\n    return 'x' * (40 << 20) if a == 1 else 0\n"
    got = run(reward, huge, {"tests": TESTS})
    assert got.value <= 0.5
