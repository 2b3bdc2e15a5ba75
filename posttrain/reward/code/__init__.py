"""Execution-checked reward for code: run the prompt's tests against the response's program.

Score = (tests passed) / (tests), in [0, 1], as a `Scored(value, reason, detail)` per sample
(reason "passed", "failed", "error", "timeout", "crash", "syntax_error" or "no_code"; detail
e.g. "3/5 tests passed; test 2: AssertionError: got 4"); None (abstain) when the prompt has
no tests. A crash, a hang, a fork bomb, a flood of output or a hostile program is its own
sample's 0 with a reason; only a sandbox that cannot start raises (`RewardInfraError`).

Parts, one job each:
    formats     the program in a response; the four test forms of a prompt row (asserts,
                HumanEval, MBPP, stdin/stdout) as a `Suite`; what `validate-data` checks
    references  prompt rows by prompt, for `score(prompts, responses)` with `prompts_file`
    sandbox     limits, the interpreter, one long-lived sandbox slot per worker
    inside      what runs inside the sandbox: slot root, supervisor, init, program server, judge
    reward      `CodeTestReward`, `run_tests`, `RunResult`

Where the tests come from: `score_with_meta(prompts, responses, metas)` gets each prompt row's
fields (`Prompt.meta`; the sample stage calls it); `score(prompts, responses)` finds them in
`prompts_file` by `prompt_key` (a hash of the non-system messages), abstaining on a prompt
the file lacks.

The program is the last ```python block of the response, else the last fenced block, else
the whole response.

Who decides a verdict: never a process that runs the program
-------------------------------------------------------------
Anything that shares a process with the program can be changed by it (builtins, frames,
signal handlers, `os._exit`, `__eq__`, the result channel). So every sample runs as two
processes under two uids, in namespaces of their own:

* the *program server* (program uid) loads the program and answers requests: call this,
  get that attribute or item, iterate, len, str. Each answer is a plain value (exact builtin
  types, `posttrain.reward._plain`), the exception raised (as its nearest builtin class), a
  timeout, or a *handle* to an object that is not plain data. It never sees a test.
* the *judge* (judge uid) runs the tests. Each name a test uses that the tests do not define
  and that is not a builtin (builtins stay the judge's own, so a program's `abs` or `sum`
  never judges) is fetched from the program: a plain value, or a proxy for a handle. A proxy
  may be called, indexed, iterated, sized and printed, each a request; it refuses `==`,
  `<`, `bool` and `hash`, so only plain data is ever compared, in the judge. The judge keeps
  its own per-test time limit (the program may turn its alarm off) and reads answers bounded
  in size and time. It writes each verdict to the report pipe, which only it holds.
* stdin/stdout cases run the program as a script once per input, started by the sample's
  init (uid 0, never program code), which captures stdout (capped: a flood fails the case),
  takes the exit status from the kernel, and reports both; the parent compares the output
  with the expected one, which never enters the sandbox (`formats.normalise_output`).

A program cannot ptrace, signal or read the judge (another uid, no /proc), nor reach the
report pipe. What it answers is only a claim about values, and any claim it can make an
honest program could make by returning that value: it scores what it honestly scores.

Isolation (root, which these machines and CI are): fresh network (loopback down), mount,
PID and IPC namespaces per sample; a chroot holding read-only /usr and the interpreter's
prefix, /dev/null, and the size-capped tmpfs /work (program) and /judge (judge), mode 700;
two unprivileged uids per worker slot, no capabilities, no_new_privs; setrlimit on CPU,
memory, processes, file size, open files, core dumps; a wall-clock limit per sample, after
which the sample's PID namespace is killed whole. See docs/design.md.
"""

from posttrain.reward.code.formats import (Suite, extract_code, normalise_output, parse_tests, row_problems,
                                           suite_from_meta)
from posttrain.reward.code.references import ReferenceIndex, prompt_key
from posttrain.reward.code.reward import CodeTestReward, RunResult, run_tests
from posttrain.reward.code.sandbox import Interpreter, Limits, Slot, find_interpreter

__all__ = ["CodeTestReward", "Interpreter", "Limits", "ReferenceIndex", "RunResult", "Slot", "Suite", "extract_code",
           "find_interpreter", "normalise_output", "parse_tests", "prompt_key", "row_problems", "run_tests",
           "suite_from_meta"]
