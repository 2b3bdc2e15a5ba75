"""Verifiable instruction following (report 4.3.7): the share of a prompt's instructions that a
response follows, judged by the IFEval and IFBench checkers of the `if-verifiable` package.

Row fields, as IFEval and IFBench ship them (a prompt row keeps them in `Prompt.meta`):

    instruction_id_list: ["punctuation:no_comma", "length_constraints:number_words"]
    kwargs:              [{}, {"num_words": 300, "relation": "at least"}]

`kwargs` holds one dict per instruction (None values are ignored: the public files fill every
dict with every key); it may be left out when no instruction takes arguments.

Registry (`registry`): `auto` looks an id up in IFEval's 25 checkers, then in IFBench's 58 (the
two sets share no id); `ifeval` or `ifbench` uses one set only.

Mode (`mode`): `strict` checks the response as it is; `loose` is the IFEval paper's loose rule:
an instruction is followed when any of eight variants passes (the response, without its first
line, its last line or both, each also with `*` removed), so loose never scores below strict.
An empty (whitespace-only) response follows nothing, as in IFEval.

Score: followed / judged instructions (IFEval's instruction-level share). The `Scored` reason is
"passed" (all followed), "failed" (the detail names the instructions not followed and why: a
checker that raised on the response, or ran past `time_limit_s`, counts as not followed),
"abstain" (value None: every instruction abstained), "no_instructions" (None: the row has
none) or "bad_row" (None: the row's instructions cannot be checked; `validate-data --kind
prompts` reports those rows before any sampling).

Abstention: a checker that needs data that is not installed (NLTK corpora raise LookupError)
abstains: the instruction leaves the denominator. Which ones do is found by trying each
instruction on a few probe responses the first time it is met (`missing_data`), and kept per
instruction id for the process; `posttrain validate` and `validate-data` list them.

`follow_flags(meta, prompt, response, mode)` gives the per-instruction booleans (None: abstained)
for prompt-level and instruction-level accuracy in a benchmark.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import os
import random
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.reward.base import DETAIL_CHARS, RewardError, Scored

log = logging.getLogger(__name__)

Message = dict[str, Any]

REGISTRIES = ("ifeval", "ifbench")
MODES = ("strict", "loose")
INSTALL_HINT = ("install the instruction-following checkers: "
                ".venv/bin/python -m pip install --no-deps -r requirements/ifeval.txt "
                "(scripts/install.sh does it)")
_ID_FIELD, _KWARGS_FIELD = "instruction_id_list", "kwargs"
_NLTK_RESOURCE = re.compile(r"Resource\s+(?:\x1b\[\d+m)?'?([\w/.-]+?)'?(?:\x1b\[0m)?\s+not found")
_MAX_BUILT = 1 << 16  # built checkers kept per process (a few KB each)
# Plain responses to try each checker on once: enough prose, paragraphs, a list and a title
# that a checker reaches the data it needs (the NLTK tokenizers, taggers, stop words).
_PROBES = (
    "The small boat left the harbour before dawn. Its crew, three tired sailors, watched the grey "
    "water rise and fall. Nobody spoke!\n\nBy noon the wind had turned, and the captain decided to "
    "head home early. Was that wise? We will never know.",
    "<<A Short Title>>\n\n* First point, with a comma.\n* Second point: a number, 42.\n\nSECTION 1\n"
    "Write the report, then read it again carefully. P.S. Thanks.",
    '{"answer": "yes", "reason": "Running quickly helps everyone."}',
)
_SEEDS = tuple(range(8))  # random states a checker is built under, to find values it draws at random


class InstructionsUnavailable(RewardError):
    """The `if-verifiable` package (or one of its dependencies) is not installed."""


class BadRow(ValueError):
    """A row's instructions cannot be checked; `field` names the row field, e.g. `kwargs[1].num_words`."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"field {field!r}: {message}")


@dataclass(frozen=True)
class Verdict:
    """One instruction's verdict on one response. followed None: the checker abstained."""

    instruction: str
    followed: bool | None
    why: str = ""  # for a failure or an abstention: "not followed", "raised ValueError: ...", ...


@dataclass(frozen=True)
class RowIssue:
    """A problem with a row's instructions. A warning leaves the row usable."""

    field: str
    message: str
    warning: bool = False


# ----------------------------------------------------------------------- the package


class _Checkers:
    """The package's two registries and its loose transformations, imported once."""

    def __init__(self) -> None:
        try:
            import langdetect
            import nltk

            # IFBench's module calls nltk.download at import time; posttrain never fetches data
            # while it scores (what is missing abstains instead), so the call is a no-op here.
            real_download = nltk.download
            nltk.download = lambda *args, **kwargs: False
            try:
                ifeval = importlib.import_module("if_verifiable.ifeval.instructions_registry")
                ifbench = importlib.import_module("if_verifiable.ifbench.instructions_registry")
            finally:
                nltk.download = real_download
            from if_verifiable.common import get_loose_transformations
        except ImportError as e:
            raise InstructionsUnavailable(f"the instruction-following reward needs the if-verifiable package "
                                          f"({e}); {INSTALL_HINT}") from e
        # langdetect draws at random; a verdict must not change between two runs. Its language
        # profiles load now: a time limit firing inside that lazy load would leave it half-built.
        langdetect.DetectorFactory.seed = 0
        importlib.import_module("langdetect.detector_factory").init_factory()
        self.registries: dict[str, dict[str, type]] = {"ifeval": dict(ifeval.INSTRUCTION_DICT),
                                                       "ifbench": dict(ifbench.INSTRUCTION_DICT)}
        self.loose_variants = get_loose_transformations
        # The checkers log whole responses at ERROR level (langdetect failures): keep them out of the log.
        package_dir = os.path.dirname(importlib.import_module("if_verifiable").__file__)
        logging.getLogger().addFilter(_DropRecordsFrom(package_dir))
        self.built: dict[tuple, _Built | BadRow] = {}
        self.prompt_readers: set[str] = set()  # ids whose checker reads the prompt (keyed by it too)
        self.missing: dict[tuple[str, str], str | None] = {}

    def lookup(self, instruction: str, registry: str) -> tuple[str, type]:
        """(registry name, checker class) of an id; BadRow-style message on an unknown one."""
        names = REGISTRIES if registry == "auto" else (registry,)
        for name in names:
            cls = self.registries[name].get(instruction)
            if cls is not None:
                return name, cls
        known = [i for n in names for i in self.registries[n]]
        close = difflib.get_close_matches(instruction, known, n=1)
        where = " nor ".join(f"{n}'s {len(self.registries[n])}" for n in names)
        raise ValueError(f"unknown instruction {instruction!r} (not among {where} checkers)"
                         + (f"; did you mean {close[0]!r}?" if close else ""))


class _DropRecordsFrom(logging.Filter):
    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.folder)


_loaded: _Checkers | None = None
_failed: InstructionsUnavailable | None = None  # kept: a prompt file is checked row by row
_load_lock = threading.Lock()


def checkers() -> _Checkers:
    """The package, imported on first use; InstructionsUnavailable (saying what to install) without it."""
    global _loaded, _failed
    with _load_lock:
        if _loaded is None:
            if _failed is not None:
                raise _failed
            try:
                _loaded = _Checkers()
            except InstructionsUnavailable as e:
                _failed = e
                raise
        return _loaded


def available() -> bool:
    """Whether the checkers can be imported here (no error raised)."""
    try:
        checkers()
    except InstructionsUnavailable:
        return False
    return True


# ------------------------------------------------------------------ building checkers


def _parameters(cls: type) -> set[str]:
    """The keyword arguments a checker's build_description names (a **kwargs catch-all names none)."""
    params = inspect.signature(cls.build_description).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _build_once(cls: type, instruction: str, kwargs: dict, prompt: str, seed: int) -> tuple[Any, dict]:
    random.seed(seed)
    checker = cls(instruction)
    checker.build_description(**kwargs)
    args = checker.get_instruction_args() or {}
    if "prompt" in args:  # the package's protocol: such a checker also reads the prompt
        checker.build_description(prompt=prompt)
        args = checker.get_instruction_args() or {}
    return checker, args


@dataclass
class _Built:
    checker: Any
    registry: str
    issues: list[RowIssue]  # warnings only (errors raise)
    reads_prompt: bool = False


def build(instruction: str, kwargs: dict, prompt: str = "", registry: str = "auto", index: int = 0) -> _Built:
    """The checker for one instruction of a row, built once per (id, kwargs) and kept.

    Raises BadRow naming the field (`instruction_id_list[i]`, `kwargs[i]`, `kwargs[i].name`) for
    an unknown id, a kwarg the checker does not take, a build that raises, or a value the row
    leaves out that the checker would draw at random. The build runs under a fixed random seed,
    so a checker that draws a value although the row gives one (IFBench's `repeat:repeat_span`
    reads `n_start: 0` as absent) is still reproducible; that is a warning in `issues`.
    A LookupError (data the build needs is missing) propagates: the caller abstains.
    """
    pkg = checkers()
    given = {k: v for k, v in kwargs.items() if v is not None}
    key = (registry, instruction, repr(sorted(given.items())), prompt if instruction in pkg.prompt_readers else None)
    built = pkg.built.get(key)
    if built is None:
        try:
            built = _build_new(pkg, instruction, given, prompt, registry)
        except BadRow as e:
            built = e
        if isinstance(built, _Built) and built.reads_prompt and key[3] is None:
            pkg.prompt_readers.add(instruction)
            key = key[:3] + (prompt,)
        if len(pkg.built) >= _MAX_BUILT:
            pkg.built.pop(next(iter(pkg.built)))
        pkg.built[key] = built
    if isinstance(built, BadRow):
        raise _indexed(built, index)
    if not built.issues:
        return built
    return _Built(built.checker, built.registry, [_indexed_issue(i, index) for i in built.issues], built.reads_prompt)


def _indexed(e: BadRow, index: int) -> BadRow:
    return BadRow(e.field.replace("[i]", f"[{index}]"), e.message)


def _indexed_issue(issue: RowIssue, index: int) -> RowIssue:
    return RowIssue(issue.field.replace("[i]", f"[{index}]"), issue.message, issue.warning)


def _build_new(pkg: _Checkers, instruction: str, given: dict, prompt: str, registry: str) -> _Built:
    try:
        registry_name, cls = pkg.lookup(instruction, registry)
    except ValueError as e:
        raise BadRow(f"{_ID_FIELD}[i]", str(e)) from None
    accepted = _parameters(cls)
    for name in sorted(given):
        if name not in accepted:
            takes = ", ".join(sorted(accepted)) or "no arguments"
            raise BadRow(f"{_KWARGS_FIELD}[i].{name}", f"{instruction!r} takes {takes}, not {name!r}")
    state = random.getstate()
    try:
        drawn = []
        for seed in _SEEDS:
            try:
                drawn.append(_build_once(cls, instruction, given, prompt, seed))
            except LookupError:
                raise  # missing data while building: the caller abstains
            except Exception as e:  # the checker refused these kwargs (ValueError, TypeError, ...)
                raise BadRow(f"{_KWARGS_FIELD}[i]", f"{instruction!r} refused its kwargs "
                             f"{_short(given)}: {type(e).__name__}: {e}") from None
    finally:
        random.setstate(state)
    first = drawn[0][1]
    varying = sorted(k for k in first if any(args.get(k) != first.get(k) for _, args in drawn[1:]))
    absent = [k for k in varying if k not in given]
    if absent:
        raise BadRow(f"{_KWARGS_FIELD}[i]", f"{instruction!r} needs {', '.join(map(repr, absent))} "
                     "(left out, the checker draws a random value)")
    checker = drawn[0][0]
    try:  # a kwarg of the wrong type ("num_words": "ten") fails on any response
        checker.check_following(_PROBES[0])
    except (TypeError, AttributeError) as e:
        raise BadRow(f"{_KWARGS_FIELD}[i]", f"{instruction!r} cannot use its kwargs {_short(given)}: "
                     f"{type(e).__name__}: {e}") from None
    except Exception:  # missing data or a probe this checker cannot read: judged on real responses
        pass
    issues = [RowIssue(f"{_KWARGS_FIELD}[i].{k}", f"{instruction!r} ignores {k}={given[k]!r} and draws a random "
                       "value (a checker bug); posttrain fixes the draw's seed so the verdict is reproducible",
                       warning=True) for k in varying]
    return _Built(checker, registry_name, issues, reads_prompt="prompt" in first)


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


# ------------------------------------------------------------------------ abstention


def _missing_resource(e: BaseException) -> str | None:
    """The NLTK resource a LookupError says is missing; None for KeyError/IndexError and the like."""
    if type(e) is not LookupError:
        return None
    found = _NLTK_RESOURCE.search(str(e))
    return f"NLTK data {found.group(1)!r} is not installed" if found else f"missing data: {str(e).strip()[:120]}"


def missing_data(instruction: str, built: _Built) -> str | None:
    """Why this instruction abstains on this machine (its checker needs data that is not
    installed), or None. Found once per instruction id by running the checker on probe
    responses, then kept."""
    pkg = checkers()
    key = (built.registry, instruction)
    if key not in pkg.missing:
        why = None
        for probe in _PROBES:
            try:
                built.checker.check_following(probe)
            except LookupError as e:
                why = _missing_resource(e)
                if why:
                    break
            except Exception:  # a checker that cannot read a probe: judged on real responses, not here
                continue
        pkg.missing[key] = why
        if why:
            log.info("instruction %r abstains on this machine: %s", instruction, why)
    return pkg.missing[key]


# --------------------------------------------------------------------- time limit


class _Timeout(BaseException):
    """Raised by the alarm inside a checker (a BaseException: a checker's own `except Exception`
    must not swallow it)."""


def _on_alarm(signum, frame):
    raise _Timeout()


@contextlib.contextmanager
def time_limits(enabled: bool = True) -> Iterator[bool]:
    """Arm SIGALRM for per-check time limits while scoring a batch; yields whether limits apply.

    Only the main thread can take signals, and a timer someone else armed is left alone: in
    those cases checks run without a limit. A few checkers' regular expressions are quadratic
    in runs of whitespace (200k newlines: minutes), so a model's output could otherwise stall
    a stage."""
    usable = (enabled and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield False
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _followed(checker: Any, texts: Sequence[str], limit: float | None) -> tuple[bool, str]:
    """(followed, why not) for one instruction: any of `texts` passing counts (strict: one text)."""
    errors = []
    if limit:
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        for text in texts:
            if not text.strip():
                continue
            try:
                if checker.check_following(text):
                    return True, ""
            except _Timeout:
                raise
            except Exception as e:  # one checker failing on one odd response is that instruction's failure
                errors.append(e)
    finally:
        if limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
    for e in errors:
        if _missing_resource(e):
            raise e
    if errors:
        e = errors[0]
        return False, f"checker raised {type(e).__name__}: {str(e)[:80]}"
    return False, "not followed"


# ----------------------------------------------------------------------------- rows


def row_instructions(meta: dict) -> tuple[list[str], list[dict]] | None:
    """The (ids, kwargs) of a row's meta, structure checked; None when the row has no
    `instruction_id_list`. Raises BadRow naming the field. Needs no package."""
    ids = meta.get(_ID_FIELD)
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids:
        raise BadRow(_ID_FIELD, f"must be a non-empty list of instruction ids, got {_short(ids)}")
    for i, iid in enumerate(ids):
        if not isinstance(iid, str) or not iid.strip():
            raise BadRow(f"{_ID_FIELD}[{i}]", f"must be an instruction id string, got {_short(iid)}")
    kwargs = meta.get(_KWARGS_FIELD)
    if kwargs is None:
        return ids, [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        got = f"{len(kwargs)} items" if isinstance(kwargs, list) else type(kwargs).__name__
        raise BadRow(_KWARGS_FIELD, f"must be a list of {len(ids)} objects, one per instruction in "
                                    f"{_ID_FIELD}, got {got}")
    out = []
    for i, kw in enumerate(kwargs):
        if kw is None:
            kw = {}
        if not isinstance(kw, dict):  # (a key that is not a string: the build names it as a kwarg not taken)
            raise BadRow(f"{_KWARGS_FIELD}[{i}]", f"must be an object of keyword arguments, got {_short(kw)}")
        out.append(kw)
    return ids, out


def prompt_text(messages: Sequence[Message]) -> str:
    """The text the instructions were given in: the last user turn."""
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def check_row(meta: dict, prompt: str = "", registry: str = "auto") -> tuple[list[RowIssue], dict[str, str]]:
    """(problems, {id: why it abstains here}) for a row's instructions; nothing for a row
    without them. For `validate-data --kind prompts`, the prompt loader and `posttrain
    validate`. Without the package only the structure is checked."""
    try:
        got = row_instructions(meta)
    except BadRow as e:
        return [RowIssue(e.field, e.message)], {}
    if got is None or not available():
        return [], {}
    issues: list[RowIssue] = []
    abstains: dict[str, str] = {}
    for i, (iid, kw) in enumerate(zip(*got)):
        try:
            built = build(iid, kw, prompt, registry, index=i)
        except BadRow as e:
            issues.append(RowIssue(e.field, e.message))
            continue
        except LookupError as e:
            abstains[iid] = _missing_resource(e) or f"LookupError: {e}"
            continue
        issues.extend(built.issues)
        why = missing_data(iid, built)
        if why:
            abstains[iid] = why
    return issues, abstains


# ---------------------------------------------------------------------------- judging


def follow_verdicts(meta: dict, prompt: str, response: str, mode: str = "strict", registry: str = "auto",
                    time_limit_s: float | None = None) -> list[Verdict]:
    """One Verdict per instruction of the row. Raises BadRow for a row that cannot be checked
    and InstructionsUnavailable without the package; never raises for a response.
    `time_limit_s` applies inside `time_limits()` (the reward arms it per batch)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    got = row_instructions(meta)
    if got is None:
        raise BadRow(_ID_FIELD, "missing: the row has no instructions to follow")
    pkg = checkers()
    built: list[_Built | str] = []  # a str: why it abstains
    for i, (iid, kw) in enumerate(zip(*got)):
        try:
            b = build(iid, kw, prompt, registry, index=i)
        except LookupError as e:
            built.append(_missing_resource(e) or f"LookupError: {e}")
            continue
        built.append(missing_data(iid, b) or b)
    if not isinstance(response, str):
        response = ""
    texts = pkg.loose_variants(response) if mode == "loose" else [response]
    limit = time_limit_s if _armed() else None
    out = []
    for iid, b in zip(got[0], built):
        if isinstance(b, str):
            out.append(Verdict(iid, None, b))
            continue
        try:
            followed, why = _followed(b.checker, texts, limit)
        except _Timeout:
            followed, why = False, f"checker ran past {time_limit_s:g} s"
        except LookupError as e:  # data the probes did not reach: this id abstains from now on
            why = _missing_resource(e)
            pkg.missing[(b.registry, iid)] = why
            log.info("instruction %r abstains on this machine: %s", iid, why)
            out.append(Verdict(iid, None, why))
            continue
        out.append(Verdict(iid, followed, why))
    return out


def _armed() -> bool:
    return hasattr(signal, "SIGALRM") and signal.getsignal(signal.SIGALRM) is _on_alarm


def follow_flags(meta: dict, prompt: str, response: str, mode: str = "strict", registry: str = "auto",
                 time_limit_s: float | None = 2.0) -> list[bool | None]:
    """Per instruction of the row: followed (True/False) or abstained (None), for prompt-level
    (all followed) and instruction-level (share followed) accuracy. Raises BadRow for a row
    that cannot be checked."""
    with time_limits(time_limit_s is not None):
        return [v.followed for v in follow_verdicts(meta, prompt, response, mode, registry, time_limit_s)]


def verdicts_scored(verdicts: Sequence[Verdict], mode: str) -> Scored:
    """The sample's score: followed / judged, with the reason and the failures as detail."""
    judged = [v for v in verdicts if v.followed is not None]
    abstained = "; ".join(f"abstained {v.instruction} ({v.why})" for v in verdicts if v.followed is None)
    if not judged:
        return Scored(None, "abstain", f"every instruction abstained: {abstained}"[:DETAIL_CHARS])
    followed = sum(v.followed for v in judged)
    failed = "; ".join(f"{v.instruction}: {v.why}" for v in judged if not v.followed)
    detail = f"{followed}/{len(judged)} instructions followed ({mode})"
    detail += "".join(f"; {part}" for part in (failed, abstained) if part)
    return Scored(followed / len(judged), "passed" if followed == len(judged) else "failed", detail[:DETAIL_CHARS])


# ----------------------------------------------------------------------------- reward


class InstructionReward:
    """The share of the prompt's verifiable instructions the response follows (IFEval /
    IFBench checkers). See the module docstring for the row fields, modes and reasons.

    Args: mode ("strict" | "loose"), registry ("auto" | "ifeval" | "ifbench"), prompts_file
    (JSONL rows with `instruction_id_list` and `kwargs`, for `score()` without metas),
    time_limit_s (per instruction and response; None: no limit).
    """

    def __init__(self, mode: str = "strict", registry: str = "auto", prompts_file: str | None = None,
                 time_limit_s: float | None = 2.0):
        if mode not in MODES:
            raise RewardError(f"InstructionReward: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if registry not in ("auto",) + REGISTRIES:
            raise RewardError(f"InstructionReward: registry must be auto, {' or '.join(REGISTRIES)}, got {registry!r}")
        if time_limit_s is not None and not time_limit_s > 0:
            raise RewardError(f"InstructionReward: time_limit_s must be > 0 or None, got {time_limit_s!r}")
        checkers()  # without the package: one clear error now, not mid-sampling
        self.mode, self.registry, self.time_limit_s = mode, registry, time_limit_s
        self.name = f"instructions_{mode}" + ("" if registry == "auto" else f"_{registry}")
        self.references = None
        if prompts_file:
            from posttrain.reward.code import ReferenceIndex

            self.references = ReferenceIndex(prompts_file, [_ID_FIELD, _KWARGS_FIELD])

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[Scored]:
        if self.references is None:
            raise ValueError("InstructionReward.score needs prompts_file= (prompt rows with instruction_id_list "
                             "and kwargs); or call score_with_meta(prompts, responses, metas)")
        return self.score_with_meta(prompts, responses, [self.references.meta_for(p) for p in prompts])

    def score_with_meta(self, prompts: list[list[Message]], responses: list[str],
                        metas: list[dict]) -> list[Scored]:
        if not len(prompts) == len(responses) == len(metas):
            raise ValueError(f"InstructionReward: {len(prompts)} prompts, {len(responses)} responses, "
                             f"{len(metas)} metas")
        with time_limits(self.time_limit_s is not None):
            return [self._one(messages, response, meta or {})
                    for messages, response, meta in zip(prompts, responses, metas)]

    def _one(self, messages: list[Message], response: str, meta: dict) -> Scored:
        if meta.get(_ID_FIELD) is None:
            return Scored(None, "no_instructions", f"the prompt row has no {_ID_FIELD}")
        try:
            verdicts = follow_verdicts(meta, prompt_text(messages), response, self.mode, self.registry,
                                       self.time_limit_s)
        except BadRow as e:
            return Scored(None, "bad_row", str(e)[:DETAIL_CHARS])
        return verdicts_scored(verdicts, self.mode)

    @staticmethod
    def prompt_warnings(prompts: Sequence[Any]) -> list[str]:
        """What `posttrain validate` says about this reward on a recipe's prompt items: what
        abstains here (`instruction_warnings`), and the rows it abstains on for want of instructions."""
        lines = instruction_warnings(prompts) if available() else [f"the reward cannot be built here: {INSTALL_HINT}"]
        without = sum(p.meta.get(_ID_FIELD) is None for p in prompts)
        if without:
            lines.append(f"{without} of {len(prompts)} rows have no {_ID_FIELD}: the instruction reward abstains "
                         "on them (reason no_instructions)")
        return lines


def instruction_warnings(prompts: Sequence[Any]) -> list[str]:
    """Warning lines for prompt items (`.meta`, `.messages`, `.source`) with instructions: the
    instructions that abstain on this machine, checker quirks a row runs into, and rows whose
    ids could not be checked because the package is missing. Nothing for rows without
    instructions; rows that cannot be checked at all are errors, reported elsewhere."""
    with_ids = [p for p in prompts if p.meta.get(_ID_FIELD) is not None]
    if not with_ids:
        return []
    if not available():
        return [f"{len(with_ids)} rows have instructions, but their ids and kwargs were not checked: {INSTALL_HINT}"]
    lines: list[str] = []
    abstaining: dict[str, tuple[str, int]] = {}
    for p in with_ids:
        issues, abstains = check_row(p.meta, prompt_text(p.messages))
        file, _, row = p.source.rpartition(":")
        lines += [f"{file}: row {row}: field {i.field!r}: {i.message}" for i in issues if i.warning]
        for iid, why in abstains.items():
            abstaining[iid] = (why, abstaining.get(iid, (why, 0))[1] + 1)
    for iid, (why, rows) in sorted(abstaining.items()):
        lines.append(f"instruction {iid!r} abstains on this machine ({why}): {rows} of {len(with_ids)} rows with "
                     "instructions use it, and it is left out of their scores")
    return lines
