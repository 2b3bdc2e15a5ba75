"""Code reward: extraction, test parsing, and the sandbox against hostile programs.

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

from posttrain.reward.code import CodeTestReward, Suite, extract_code, parse_tests

UID_BASE = 1_990_100_000
WORKERS = 2


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


@pytest.fixture(scope="module")
def reward():
    r = CodeTestReward(timeout_s=4.0, test_timeout_s=1.0, cpu_s=4, memory_mb=512, max_procs=16,
                       max_output_bytes=4096, max_workers=WORKERS, uid_base=UID_BASE)
    try:
        r.setup()
    except RuntimeError as e:
        pytest.skip(f"no OS sandbox on this machine: {e}")
    yield r
    assert _uids_alive(UID_BASE, UID_BASE + WORKERS) == [], "a sandboxed process outlived its run"


def score(reward, code: str, tests, fenced: bool = True) -> float:
    response = f"Here you go:\n```python\n{code}\n```\n" if fenced else code
    return reward.score_with_meta([[{"role": "user", "content": "q"}]], [response], [{"tests": tests}])[0]


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
    assert r.score(prompts, ["```python\ndef add(a, b): return a + b\n```", "x"]) == [1.0, None]


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
    time.sleep(0.2)
    assert _uids_alive(UID_BASE, UID_BASE + WORKERS) == []


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
    assert scores == [1.0, 0.0, 0.0, 1.0]


# --- removed: the unisolated mode -----------------------------------------------------------

def test_process_mode_is_gone():
    """It ran programs as a plain child of a root process; `_posixsubprocess.fork_exec` (no
    audit event) started a shell on the host."""
    with pytest.raises(ValueError, match="removed"):
        CodeTestReward(isolation="process")


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
