"""CodeTestReward: the share of a prompt's tests the response's program passes, with the reason."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from posttrain.reward.base import RewardInfraError, Scored
from posttrain.reward.code.formats import (COMPARE_FUNCTION, FORM_FIELDS, Suite, explained, extract_code,
                                           free_names, normalise_output, suite_from_meta)
from posttrain.reward.code.references import ReferenceIndex
from posttrain.reward.code.sandbox import Interpreter, Limits, Raw, Slot, find_interpreter

log = logging.getLogger(__name__)

Message = dict[str, Any]

ISOLATION_MODES = ("auto", "namespace")

# A test's failure kind -> the sample's reason when it is the first failure that is not a plain
# wrong answer ("failed" when every failure is one).
_REASON_ORDER = ("syntax_error", "error", "timeout", "crash")


@dataclass
class RunResult:
    """One program against one suite: a verdict per test, each decided outside the program."""
    passed: list[bool]             # one per test (per stdin case)
    errors: list[str] = field(default_factory=list)   # per test: "" or why it failed
    kinds: list[str] = field(default_factory=list)    # per test: "passed", "failed", "error", "timeout", "crash", "syntax_error"
    loaded: bool = True            # the program loaded (calls form) / ran at all
    timed_out: bool = False        # the sample's wall-clock limit ran out
    output: str = ""               # the program's stdout+stderr, truncated (calls form)
    no_code: bool = False

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0

    def scored(self) -> Scored:
        """The sample's Scored: value = fraction passed, reason = the sample's category, detail
        = the count and the first failure."""
        n, k = len(self.passed), sum(self.passed)
        if self.no_code:
            return Scored(0.0, "no_code", "the response has no code")
        if k == n:
            return Scored(1.0, "passed", f"{k}/{n} tests passed")
        failing = [i for i in range(n) if not self.passed[i]]
        kinds = {self.kinds[i] for i in failing}
        reason = next((r for r in _REASON_ORDER if r in kinds), "failed")
        first = failing[0]
        return Scored(k / n, reason, f"{k}/{n} tests passed; test {first}: {self.errors[first]}"[:300])


def run_tests(code: str, suite: Suite, slot: Slot) -> RunResult:
    """Run `code` against `suite` in one sandbox of `slot` (see the package docstring)."""
    n = len(suite)
    if not code.strip():
        return RunResult([False] * n, ["no code"] * n, ["failed"] * n, loaded=False, no_code=True)
    if suite.mode == "stdio":
        raw = slot.run("stdio", [{"program": code, "inputs": suite.inputs}])
        return _stdio_result(raw, suite, slot)
    names, modules = free_names(suite)
    judge_job = {"setup": explained(suite.setup) if suite.setup else "", "tests": [explained(t) for t in suite.tests],
                 "names": names, "modules": modules, "compare_function": COMPARE_FUNCTION}
    raw = slot.run("calls", [{"program": code}, judge_job])
    return _calls_result(raw, n, slot)


def _calls_result(raw: Raw, n: int, slot: Slot) -> RunResult:
    load = next((e for e in raw.report if "load" in e), None)
    if load is None:
        if raw.timed_out:
            return RunResult([False] * n, ["time limit (the sample's wall clock)"] * n, ["timeout"] * n,
                             loaded=False, timed_out=True, output=raw.output)
        # The judge always says whether the program loaded: this sample's sandbox broke (the
        # machine's OOM killer, say). The sample's 0; the slot restarts, and probes, before its next.
        slot.close()
        return RunResult([False] * n, ["the sandbox gave no report"] * n, ["crash"] * n, loaded=False,
                         output=raw.output)
    if load["load"] is not True:
        kind = load.get("kind") if load.get("kind") in ("syntax_error", "timeout", "crash") else "error"
        why = f"the program failed to load: {str(load.get('error', ''))[:250]}"
        return RunResult([False] * n, [why] * n, [kind] * n, loaded=False, timed_out=raw.timed_out, output=raw.output)
    passed, errors, kinds = [False] * n, ["no verdict"] * n, ["crash"] * n
    seen: set[int] = set()
    for e in raw.report:
        t = e.get("t")
        if type(t) is int and 0 <= t < n and t not in seen:
            seen.add(t)
            passed[t] = e.get("ok") is True
            errors[t] = "" if passed[t] else str(e.get("error", ""))[:300]
            kinds[t] = "passed" if passed[t] else str(e.get("kind", "error"))
    for t in set(range(n)) - seen:
        if raw.timed_out:
            errors[t], kinds[t] = "time limit (the sample's wall clock)", "timeout"
    return RunResult(passed, errors, kinds, loaded=True, timed_out=raw.timed_out, output=raw.output)


def _stdio_result(raw: Raw, suite: Suite, slot: Slot) -> RunResult:
    n = len(suite)
    cases = {e["case"]: e for e in raw.report if type(e.get("case")) is int}
    if not cases and not raw.timed_out:
        slot.close()  # as in _calls_result: the sample's 0, and a fresh slot for the next
        return RunResult([False] * n, ["the sandbox gave no report"] * n, ["crash"] * n, loaded=False,
                         output=raw.output)
    passed, errors, kinds = [False] * n, ["time limit (the sample's wall clock)"] * n, ["timeout"] * n
    for k in range(n):
        e = cases.get(k)
        if e is None:
            continue
        got = str(e.get("out", ""))
        if e.get("flood"):
            errors[k], kinds[k] = "stdout over the output limit", "failed"
        elif e.get("timeout"):
            errors[k], kinds[k] = "time limit", "timeout"
        elif e.get("exit") != 0:
            errors[k], kinds[k] = f"exit status {e.get('exit')}", "error"
        elif normalise_output(got) != normalise_output(suite.outputs[k]):
            errors[k], kinds[k] = f"wrong output: got {_short(got)}", "failed"
        else:
            passed[k], errors[k], kinds[k] = True, "", "passed"
    return RunResult(passed, errors, kinds, loaded=True, timed_out=raw.timed_out, output=raw.output)


def _short(text: str) -> str:
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


class CodeTestReward:
    """Share of the prompt's tests that the response's program passes (see the package docstring).

    Args (all JSON-able, for recipes):
        prompts_file: JSONL of prompt rows with test fields, for `score()`.
        isolation: "auto" or "namespace" (the same: root namespaces; error if unavailable).
        timeout_s: wall-clock limit for one sample (all its processes and tests).
        test_timeout_s: limit for loading the program, for each test and each stdin case.
        cpu_s, memory_mb, max_procs, file_mb, work_mb, max_output_bytes: see `Limits`.
        max_workers: samples run at once (one sandbox slot, with two uids, each).
        python: interpreter for the programs (default: the current one; stdlib only).
        uid_base: the slots use uids uid_base .. uid_base + 2 * max_workers - 1.
    """

    name = "code_tests"
    META_FIELDS = tuple(FORM_FIELDS)

    def __init__(self, prompts_file: str | None = None, isolation: str = "auto", timeout_s: float = 10.0,
                 test_timeout_s: float = 3.0, cpu_s: int = 10, memory_mb: int = 1024, max_procs: int = 32,
                 file_mb: int = 16, work_mb: int = 64, max_output_bytes: int = 65536, max_workers: int = 2,
                 python: str | None = None, uid_base: int = 1_990_000_000):
        if isolation in ("process", "userns"):
            raise ValueError(f"CodeTestReward: isolation={isolation!r} was removed: the program and its judge "
                             "must run as two different uids, which needs root namespaces; use 'auto'")
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"CodeTestReward: isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        if max_workers < 1:
            raise ValueError(f"CodeTestReward: max_workers must be >= 1, got {max_workers}")
        if not 0 < test_timeout_s <= timeout_s:
            raise ValueError("CodeTestReward: need 0 < test_timeout_s <= timeout_s")
        self.limits = Limits(wall_s=timeout_s, test_s=test_timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                             max_procs=max_procs, file_mb=file_mb, work_mb=work_mb, max_output_bytes=max_output_bytes)
        self.max_workers = max_workers
        self.python = python
        self.uid_base = uid_base
        self.references = ReferenceIndex(prompts_file, self.META_FIELDS) if prompts_file else None
        if self.references is not None:  # bad tests fail here, naming the row, not mid-sampling
            for key, meta in self.references._metas.items():
                suite_from_meta(meta, f"{prompts_file}: row {self.references._rows[key]}")
        self.isolation: str | None = None   # "namespace" once setup() has probed it
        self.interpreter: Interpreter | None = None
        self._slots: queue.Queue[Slot] | None = None
        self._all_slots: list[Slot] = []
        self._lock = threading.Lock()

    def setup(self) -> None:
        """Start the sandbox slots and probe them with a real run; RewardInfraError when the
        sandbox cannot start here."""
        with self._lock:
            if self.isolation is not None:
                return
            interp = find_interpreter(self.python)
            slots = [Slot(interp, self.limits, self.uid_base + 2 * i, self.uid_base + 2 * i + 1)
                     for i in range(self.max_workers)]
            try:
                for slot in slots:
                    slot.start()   # each probes itself with a real sample
            except RewardInfraError:
                for slot in slots:
                    slot.close()
                raise
            self._all_slots = slots
            self._slots = queue.Queue()
            for slot in slots:
                self._slots.put(slot)
            self.isolation, self.interpreter = "namespace", interp
            log.info("CodeTestReward: isolation=namespace interpreter=%s slots=%d", interp.executable, len(slots))

    def teardown(self) -> None:
        """Stop the slots (each sample's processes are already gone when it finishes)."""
        with self._lock:
            for slot in self._all_slots:
                slot.close()
            self._all_slots, self._slots, self.isolation = [], None, None

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[Scored | None]:
        if self.references is None:
            raise ValueError("CodeTestReward.score needs prompts_file= (prompt rows with test fields); "
                             "or call score_with_meta(prompts, responses, metas)")
        return self.score_with_meta(prompts, responses, [self.references.meta_for(p) for p in prompts])

    def score_with_meta(self, prompts: list[list[Message]], responses: list[str],
                        metas: list[dict]) -> list[Scored | None]:
        """One Scored per sample (None: the prompt has no tests, the reward abstains)."""
        if not len(prompts) == len(responses) == len(metas):
            raise ValueError(f"CodeTestReward: {len(prompts)} prompts, {len(responses)} responses, {len(metas)} metas")
        suites = [suite_from_meta(meta, f"sample {i}") for i, meta in enumerate(metas)]
        return [None if r is None else r.scored() for r in self.run_batch(responses, suites)]

    def run_batch(self, responses: Sequence[str], suites: Sequence[Suite | None],
                  program=extract_code) -> list[RunResult | None]:
        """Run each response's program (`program(response)`: by default its code as
        `extract_code` finds it) against its suite (None: skipped), `max_workers` at a time."""
        self.setup()
        assert self._slots is not None

        def one(i: int) -> RunResult | None:
            if suites[i] is None:
                return None
            slot = self._slots.get()
            try:
                return run_tests(program(responses[i]), suites[i], slot)
            finally:
                self._slots.put(slot)

        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="code-reward") as pool:
            return list(pool.map(one, range(len(responses))))
