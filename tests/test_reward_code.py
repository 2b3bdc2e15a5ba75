"""Code reward: extraction, the test forms, reasons, and the sandbox against hostile programs.

The adversarial cases each must score 0 (or their limit must bind) without harming the run:
an infinite loop, a flood of output, a fork bomb, reading files outside the working folder,
opening a connection to a port this test listens on, forging the result, escaping the
process group. They run on the OS-isolated sandbox; where none works here they are skipped.
Attacks on the verdict itself (each must score at most what the honest wrong program
scores) are in tests/test_reward_code_attacks.py.
"""

import json
import os
import socket
import time
from pathlib import Path

import pytest

from posttrain.reward import RewardInfraError
from posttrain.reward.code import CodeTestReward, Suite, extract_code, normalise_output, parse_tests, suite_from_meta
from posttrain.reward.code.formats import FORM_FIELDS, explained

UID_BASE = 1_990_100_000
WORKERS = 2
UIDS = (UID_BASE, UID_BASE + 2 * WORKERS)  # a program uid and a judge uid per worker


def _uids_alive(lo: int, hi: int) -> list[int]:
    """pids of processes whose real uid is in [lo, hi): what a sandbox could leave behind."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue  # exited meanwhile
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if lo <= uid < hi:
            found.append(int(entry))
    return found


def _uids_gone(lo: int, hi: int, wait_s: float = 3.0) -> bool:
    """No process of these uids is left, once the ones already dying have finished (a process
    that frees a large address space takes a moment)."""
    deadline = time.monotonic() + wait_s
    while _uids_alive(lo, hi):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def reward():
    r = CodeTestReward(timeout_s=4.0, test_timeout_s=1.0, cpu_s=4, memory_mb=512, max_procs=16,
                       max_output_bytes=4096, max_workers=WORKERS, uid_base=UID_BASE)
    try:
        r.setup()
    except RuntimeError as e:
        pytest.skip(f"no OS sandbox on this machine: {e}")
    yield r
    assert _uids_gone(*UIDS), "a sandboxed process outlived its sample"
    r.teardown()


def verdict(reward, code: str, meta: dict, fenced: bool = True):
    response = f"Here you go:\n```python\n{code}\n```\n" if fenced else code
    return reward.score_with_meta([[{"role": "user", "content": "q"}]], [response], [meta])[0]


def score(reward, code: str, tests, fenced: bool = True) -> float:
    return verdict(reward, code, {"tests": tests}, fenced).value


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 5) == 5"]


# --- extraction and parsing -----------------------------------------------------------------

def test_extract_code_takes_last_python_block_else_last_block_else_all():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```\n```\nc\n```") == "b = 2\n"
    assert extract_code("```js\nx\n```\n```\ny = 3\n```") == "y = 3\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"


def test_parse_tests_list_and_source():
    assert parse_tests(["assert f(1)", "assert f(2)"]).tests == ["assert f(1)", "assert f(2)"]
    suite = parse_tests("import math\ndef near(a, b):\n    return abs(a - b) < 1e-9\nassert near(f(1), 1)\nassert f(2) == 2\n")
    assert suite.tests == ["assert near(f(1), 1)", "assert f(2) == 2"]
    assert "def near" in suite.setup and "import math" in suite.setup
    with pytest.raises(ValueError, match="sample 3: field 'tests'"):
        parse_tests("x = 1", where="sample 3: field 'tests'")
    with pytest.raises(ValueError, match=r"tests\[1\]: not valid Python"):
        parse_tests(["assert 1", "assert ("])


# --- scoring ----------------------------------------------------------------------------------

def test_correct_partial_wrong_and_abstain(reward):
    assert score(reward, "def add(a, b):\n    return a + b", ADD_TESTS) == 1.0
    # 2 * max(a, b): add(1, 2) = 4, add(-1, 1) = 2, add(2, 2) = 4 (the one pass), add(0, 5) = 10
    assert score(reward, "def add(a, b):\n    return 2 * max(a, b)", ADD_TESTS) == 0.25
    assert score(reward, "def add(a, b) return", ADD_TESTS) == 0.0          # syntax error
    assert score(reward, "raise SystemExit(0)", ADD_TESTS) == 0.0            # exits before the tests
    prompts = [[{"role": "user", "content": "q"}]] * 2
    assert reward.score_with_meta(prompts, ["x", "y"], [{}, {"tests": []}]) == [None, None]


def test_test_source_with_setup(reward):
    tests = "def close(a, b):\n    return abs(a - b) < 1e-6\nassert close(half(1), 0.5)\nassert close(half(3), 1.5)\nassert half(0) == 1\n"
    assert score(reward, "def half(x):\n    return x / 2", tests) == pytest.approx(2 / 3)


def test_one_hanging_test_fails_alone(reward):
    code = "def f(x):\n    while x < 0:\n        pass\n    return x"
    t0 = time.monotonic()
    assert score(reward, code, ["assert f(1) == 1", "assert f(-1) == -1", "assert f(2) == 2"]) == pytest.approx(2 / 3)
    assert time.monotonic() - t0 < 3.5


def test_prompts_file_lookup(reward, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "p1", "prompt": "Write add.", "tests": ADD_TESTS}) + "\n")
    r = CodeTestReward(prompts_file=str(path), uid_base=UID_BASE, max_workers=1)
    r.isolation, r.interpreter, r._slots = reward.isolation, reward.interpreter, reward._slots
    prompts = [[{"role": "system", "content": "Write Python."}, {"role": "user", "content": "Write add."}],
               [{"role": "user", "content": "Something else"}]]
    got = r.score(prompts, ["```python\ndef add(a, b): return a + b\n```", "x"])
    assert got[0].value == 1.0 and got[1] is None


# --- adversarial ------------------------------------------------------------------------------

def test_infinite_loop_is_killed_within_the_limit(reward):
    t0 = time.monotonic()
    assert score(reward, "while True:\n    pass", ADD_TESTS) == 0.0
    assert time.monotonic() - t0 < 3.0   # killed by the 1 s load alarm, well inside the 4 s wall


def test_infinite_loop_ignoring_alarms_hits_the_wall_clock(reward):
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass"
    t0 = time.monotonic()
    assert score(reward, code, ADD_TESTS) == 0.0
    assert time.monotonic() - t0 < 6.0


def test_huge_output_is_capped(reward):
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    t0 = time.monotonic()
    result = reward.run_batch([code], [Suite("", ["assert True"])])[0]
    assert result.passed == [False] and not result.loaded
    assert len(result.output) <= 4096
    assert time.monotonic() - t0 < 6.0


def test_huge_file_is_capped(reward):
    code = "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))"
    assert score(reward, code, ["assert True"]) == 0.0


def test_memory_bomb_fails(reward):
    assert score(reward, "x = bytearray(4 << 30)\ndef add(a, b): return a + b", ADD_TESTS) == 0.0


def test_fork_bomb_is_bounded(reward):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    assert score(reward, code, ADD_TESTS) == 0.0
    assert time.monotonic() - t0 < 6.0


def test_process_limit_binds(reward):
    """RLIMIT_NPROC is really enforced: forking stops near max_procs (16) processes."""
    code = ("import os, time\nforked = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "    forked += 1\n")
    result = reward.run_batch([code], [Suite("", ["assert 5 < forked < 16", "assert forked < 100"])])[0]
    assert result.passed == [True, True], result.errors


def test_escaped_session_is_killed(reward):
    """A child that leaves the process group dies with the sandbox (PID namespace)."""
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\ndef add(a, b): return a + b"
    assert score(reward, code, ADD_TESTS) == 1.0
    assert _uids_gone(*UIDS, wait_s=1.0)


def test_reading_files_outside_the_folder_fails(reward, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o644)  # readable by anyone: only the sandbox's view of the files protects it
    code = f"SECRET = open({str(secret)!r}).read()"
    assert score(reward, code, ["assert SECRET == 's3cret'"]) == 0.0
    assert score(reward, "H = open('/etc/hostname').read()", ["assert len(H) > 0"]) == 0.0
    assert score(reward, "import os\nTOP = os.listdir('/')", ["assert 'etc' in TOP or 'home' in TOP"]) == 0.0
    # and the own folder works
    assert score(reward, "open('a.txt', 'w').write('hi')\nA = open('a.txt').read()", ["assert A == 'hi'"]) == 1.0


def test_connection_to_a_local_listener_fails(reward):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        code = (f"import socket\ndef call():\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
                "    s.sendall(b'hello')\n    return True\n")
        assert score(reward, code, ["assert call()"]) == 0.0
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever arrived


def test_stdlib_still_works_in_the_sandbox(reward):
    code = ("import collections, dataclasses, enum, typing, json, re, itertools, functools\n"
            "P = collections.namedtuple('P', 'x y')\n@dataclasses.dataclass\nclass Q:\n    a: int\n"
            "class C(enum.Enum):\n    A = 1\ndef add(a, b): return P(a, b).x + Q(b).a\n")
    assert score(reward, code, ADD_TESTS) == 1.0


def test_a_bad_sample_costs_only_itself(reward):
    responses = ["def add(a, b): return a + b", "while True: pass", "import os\nos.kill(os.getppid(), 9)",
                 "def add(a, b): return a + b"]
    prompts = [[{"role": "user", "content": "q"}]] * 4
    scores = reward.score_with_meta(prompts, responses, [{"tests": ADD_TESTS}] * 4)
    assert [s.value for s in scores] == [1.0, 0.0, 0.0, 1.0]
    assert [s.reason for s in scores] == ["passed", "timeout", "error", "passed"]


# --- removed: the unisolated mode -----------------------------------------------------------

def test_unisolated_and_single_uid_modes_are_gone():
    """"process" ran programs as a plain child of a root process (`_posixsubprocess.fork_exec`
    started a shell on the host); "userns" maps a single uid, so the judge and the program
    could not be two uids."""
    for mode in ("process", "userns"):
        with pytest.raises(ValueError, match="removed"):
            CodeTestReward(isolation=mode)


def test_a_slot_that_dies_is_restarted(reward):
    """A slot's root process that is gone (killed from outside) costs no sample: the sample
    runs again on a fresh slot, which probes itself first."""
    import signal
    for slot in list(reward._all_slots):
        os.killpg(slot.proc.pid, signal.SIGKILL)
        slot.proc.wait()
    responses = ["def add(a, b):\n    return a + b\n"] * 2
    got = reward.score_with_meta([[{"role": "user", "content": "q"}]] * 2, responses, [{"tests": ADD_TESTS}] * 2)
    assert [g.value for g in got] == [1.0, 1.0]
    assert all(slot.proc.poll() is None for slot in reward._all_slots)


def test_a_sandbox_that_cannot_start_is_an_infrastructure_error(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RewardInfraError, match="needs root"):
        CodeTestReward(max_workers=1, uid_base=UID_BASE).setup()


def test_prompts_file_with_bad_tests_names_the_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "tests": ["assert 1"]}) + "\n"
                    + json.dumps({"prompt": "b", "tests": ["assert ("]}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl: row 2: field 'tests'\[0\]: not valid Python"):
        CodeTestReward(prompts_file=str(path))


def test_prompts_file_must_be_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(ValueError, match="not a regular file"):
        CodeTestReward(prompts_file=str(tmp_path / "fifo.jsonl"))
    with pytest.raises(ValueError, match="not a regular file"):
        CodeTestReward(prompts_file="/dev/zero")
    row = {"prompt": "a\u2028b", "tests": ["assert f() == 1"]}
    (tmp_path / "p.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    assert len(CodeTestReward(prompts_file=str(tmp_path / "p.jsonl")).references) == 1


def test_bad_kwargs_fail_early():
    with pytest.raises(ValueError, match="isolation"):
        CodeTestReward(isolation="docker")
    with pytest.raises(ValueError, match="max_workers"):
        CodeTestReward(max_workers=0)
    with pytest.raises(ValueError, match="score_with_meta"):
        CodeTestReward().score([[{"role": "user", "content": "q"}]], ["x"])


# --- the test forms of real datasets ----------------------------------------------------------

HUMANEVAL = {"test": "METADATA = {'author': 'x'}\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
                     "    assert abs(candidate([0.5]) - 0.5) < 1e-9\n    assert candidate([]) == 0\n",
             "entry_point": "total"}
MBPP = {"test_list": ["assert total(DATA) == 6", "assert total([]) == 0"], "test_setup_code": "DATA = [1, 2, 3]"}
STDIN = {"inputs": ["1 2\n", "5 -5\n", "10 20"], "outputs": ["3\n", "0", "30\n\n"]}
ADD_SCRIPT = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"


def test_each_form_reads_its_fields():
    assert suite_from_meta({"tests": ADD_TESTS}).tests == ADD_TESTS
    he = suite_from_meta(HUMANEVAL)
    assert he.tests == ["check(total)"] and "def check" in he.setup and he.program_names == ("total",)
    mbpp = suite_from_meta(MBPP)
    assert mbpp.setup == "DATA = [1, 2, 3]" and mbpp.tests == MBPP["test_list"]
    io = suite_from_meta(STDIN)
    assert io.mode == "stdio" and io.inputs == STDIN["inputs"] and len(io) == 3
    assert suite_from_meta({}) is None and suite_from_meta({"tests": []}) is None and suite_from_meta(None) is None
    from posttrain import data
    assert tuple(FORM_FIELDS) == data._CODE_TEST_FIELDS   # validate-data looks for the same fields


@pytest.mark.parametrize("meta, match", [
    ({"test": "assert f(1)", "entry_point": "f"}, r"sample 0: field 'test': no top-level `def check"),
    ({"test": "def check(c): pass"}, r"field 'entry_point': expected a non-empty string"),
    ({"test_list": ["assert f(1) == 1", 3]}, r"field 'test_list'\[1\]: expected a string"),
    ({"test_list": ["assert f(1) == 1"], "test_setup_code": 5}, r"field 'test_setup_code': expected a string"),
    ({"inputs": ["1"], "outputs": []}, r"field 'outputs': expected a non-empty list"),
    ({"inputs": ["1", "2"], "outputs": ["1"]}, r"field 'outputs': 1 outputs for 2 inputs"),
    ({"tests": ["assert 1"], "inputs": ["1"], "outputs": ["1"]}, r"mix test forms"),
])
def test_bad_test_fields_name_the_field(meta, match):
    with pytest.raises(ValueError, match=match):
        suite_from_meta(meta, "sample 0")


def test_validate_data_checks_every_form(tmp_path):
    from posttrain.cli import main

    rows = [{"prompt": "a", "tests": ADD_TESTS}, {"prompt": "b", **HUMANEVAL}, {"prompt": "c", **MBPP},
            {"prompt": "d", **STDIN}, {"prompt": "e", "test": "x = 1", "entry_point": "f"},
            {"prompt": "f", "test_list": ["assert ("]}, {"prompt": "g", "inputs": ["1"], "outputs": ["1", "2"]}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from posttrain import data
    report = data.validate_file(path, "prompts")
    assert [(p.row, p.field) for p in report.problems] == [(5, "test"), (6, "test_list[0]"), (7, "outputs")]
    assert main(["validate-data", str(path), "--kind", "prompts"]) != 0


def test_stdout_normalisation_rule():
    assert normalise_output("a  \r\nb\t\n\n\n") == normalise_output("a\nb") == "a\nb"
    assert normalise_output(" a\n\nb") != normalise_output("a\nb")   # leading space and inner blank lines count
    assert normalise_output("A") != normalise_output("a")


def test_humaneval_form(reward):
    right = "def total(xs):\n    return sum(xs)\n"
    got = verdict(reward, right, HUMANEVAL)
    assert (got.value, got.reason) == (1.0, "passed")
    wrong = verdict(reward, "def total(xs):\n    return len(xs)\n", HUMANEVAL)
    assert (wrong.value, wrong.reason) == (0.0, "failed")
    assert wrong.detail == "0/1 tests passed; test 0: AssertionError: got 2"   # what candidate([1, 2]) gave
    # the program defines a helper the test also calls, as HumanEval's prompts do (poly, encode_shift)
    helper = {"test": "def check(candidate):\n    assert helper(candidate(2)) == 5\n", "entry_point": "f"}
    assert verdict(reward, "def helper(x):\n    return x + 1\ndef f(x):\n    return 2 * x\n", helper).value == 1.0


def test_mbpp_form_with_setup(reward):
    assert verdict(reward, "def total(xs):\n    return sum(xs)\n", MBPP).value == 1.0
    assert verdict(reward, "def total(xs):\n    return 6\n", MBPP).value == 0.5


def test_stdin_form(reward):
    got = verdict(reward, ADD_SCRIPT, STDIN)
    assert (got.value, got.reason) == (1.0, "passed")
    wrong = verdict(reward, "print(3)", STDIN)
    assert wrong.value == pytest.approx(1 / 3) and wrong.reason == "failed" and "wrong output: got '3\\n'" in wrong.detail
    # exit status 0 is required, even after the right output
    crash = verdict(reward, ADD_SCRIPT + "raise SystemExit(3)\n", STDIN)
    assert (crash.value, crash.reason) == (0.0, "error") and "exit status 3" in crash.detail
    # the program runs as a script: its main guard runs, input() reads the case
    main_guard = "def solve():\n    a, b = map(int, input().split())\n    print(a + b)\nif __name__ == '__main__':\n    solve()\n"
    assert verdict(reward, main_guard, STDIN).value == 1.0


def test_stdin_case_limits(reward):
    flood = verdict(reward, "import sys\nwhile True:\n    sys.stdout.write('3\\n' * 1000)\n", STDIN)
    assert flood.value == 0.0 and "output limit" in flood.detail
    t0 = time.monotonic()
    hang = verdict(reward, "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
                   {"inputs": ["1"], "outputs": ["1"]})
    assert (hang.value, hang.reason) == (0.0, "timeout")
    assert time.monotonic() - t0 < 3.0
    # a case's leftover processes die with it: they cannot write into the next case's output
    forker = ("import os, sys, time\ndata = sys.stdin.read()\nif os.fork() == 0:\n    time.sleep(0.3)\n"
              "    print('late')\n    os._exit(0)\nprint(sum(map(int, data.split())))\n")
    assert verdict(reward, forker, STDIN).value == 1.0


def test_reasons_and_details(reward):
    assert verdict(reward, "", {"tests": ADD_TESTS}, fenced=False).reason == "no_code"
    syntax = verdict(reward, "def add(a, b) return", {"tests": ADD_TESTS})
    assert (syntax.value, syntax.reason) == (0.0, "syntax_error") and "SyntaxError" in syntax.detail
    error = verdict(reward, "import no_such_module\n", {"tests": ADD_TESTS})
    assert error.reason == "error" and "ModuleNotFoundError" in error.detail
    partial = verdict(reward, "def add(a, b):\n    return 2 * max(a, b)\n", {"tests": ADD_TESTS})
    assert partial.reason == "failed" and partial.detail == "1/4 tests passed; test 0: AssertionError: got 4"
    raises = verdict(reward, "def add(a, b):\n    return a + b if a else 1 / 0\n", {"tests": ADD_TESTS})
    assert raises.value == 0.75 and raises.reason == "error" and "ZeroDivisionError" in raises.detail
    hang = verdict(reward, "def add(a, b):\n    while a == 1:\n        pass\n    return a + b\n", {"tests": ADD_TESTS})
    assert hang.value == 0.75 and hang.reason == "timeout"
    crash = verdict(reward, "import os\ndef add(a, b):\n    os._exit(0)\n", {"tests": ADD_TESTS})
    assert (crash.value, crash.reason) == (0.0, "crash")


def test_object_tests(reward):
    stack = ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
             "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n"
             "    def __len__(self):\n        return len(self.items)\n    def __iter__(self):\n"
             "        return iter(list(self.items))\n")
    tests = ["s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2\nassert len(s) == 1",
             "s = Stack()\nfor i in range(3):\n    s.push(i)\nassert list(s) == [0, 1, 2] and s.items == [0, 1, 2]",
             "s = Stack()\ntry:\n    s.pop()\nexcept IndexError:\n    pass\nelse:\n    assert False"]
    assert score(reward, stack, tests) == 1.0
    # pop returns the bottom item: the first test fails; an empty stack still raises IndexError
    assert score(reward, stack.replace("self.items.pop()", "self.items[0]"), tests) == pytest.approx(2 / 3)


def test_program_objects_go_back_to_the_program_by_handle(reward):
    code = ("class Node:\n    def __init__(self, val, next=None):\n        self.val, self.next = val, next\n"
            "def link(a, b):\n    a.next = b\n    return a\n")
    tests = ["a, b = Node(1), Node(2)\nlink(a, b)\nassert a.next.val == 2",
             "c = Node(3, Node(4))\nassert c.next.next is None and c.next.val == 4",
             "d = Node(5)\nd.val = 6\nassert d.val == 6"]
    assert score(reward, code, tests) == 1.0
    # a test's own objects (here a function) are not passed to the program
    got = verdict(reward, code, {"tests": ["assert link(lambda: 1, Node(1)) is not None"]})
    assert got.value == 0.0 and "only plain data and the program's own objects" in got.detail


def test_explained_asserts_keep_their_meaning():
    assert explained("assert f(1) == 2") == "__posttrain_assert__(f(1), 'Eq', 2)"
    assert explained("assert a < b < c") == "assert a < b < c"          # chained: left as is
    assert explained("assert f(1) == 2, 'msg'") == "assert f(1) == 2, 'msg'"


def test_a_prompts_file_row_with_a_5000_digit_integer_names_its_row(tmp_path):
    from posttrain.reward.code.references import ReferenceIndex

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x", "tests": ["assert f() == 1"], "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(ValueError, match=rf"{path}: row 1: cannot be read: Exceeds the limit"):
        ReferenceIndex(path, ["tests"])
