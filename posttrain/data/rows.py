"""What a row must hold, per kind (preference, SFT, prompt), and the dataclasses rows become.

Each parser takes one row as read (posttrain.data.read) and returns a `Preference`,
`SFTExample` or `Prompt`, or records a `DataError` per problem (naming the field) and returns
None: every problem of a row is reported, not only the first. Unknown extra columns in
preference and SFT rows are ignored; in prompt rows they are kept in `Prompt.meta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.data.errors import DataError

STRENGTHS = ("significantly_better", "better", "slightly_better", "marginally_better")
ROLES = ("system", "user", "assistant", "ipython", "tool")
Kind = Literal["preference", "sft", "prompts"]


@dataclass
class Preference:
    """A ranking of 2 or 3 responses to one prompt: edited > chosen > rejected."""

    id: str
    prompt: list[dict]  # the conversation up to the ranked assistant turn
    chosen: str
    rejected: str
    edited: str | None = None
    strength: str | None = None
    capability: str | None = None
    source: str = ""  # "file:row"


@dataclass
class SFTExample:
    id: str
    messages: list[dict]  # ends with an assistant turn
    capability: str | None = None
    source: str = ""


@dataclass
class Prompt:
    id: str
    messages: list[dict]  # ends before the assistant turn to generate
    capability: str | None = None
    system: str | None = None
    meta: dict = field(default_factory=dict)
    source: str = ""


class Row:
    """Checks on one row; each failed check records a DataError and returns None."""

    def __init__(self, file: str, row: int, data: dict):
        self.file, self.row, self.data = file, row, data
        self.errors: list[DataError] = []

    @property
    def source(self) -> str:
        return f"{self.file}:{self.row}"

    def fail(self, field: str | None, message: str) -> None:
        self.errors.append(DataError(self.file, self.row, field, message))

    def get(self, key: str) -> Any:
        # Parquet and datasets fill absent columns with None: None means absent.
        return self.data.get(key)

    def optional_str(self, key: str, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {type(value).__name__}")
            return None
        if choices is not None and value not in choices:
            self.fail(key, f"unknown label {value!r} (expected one of {', '.join(choices)})")
            return None
        return value

    def row_id(self) -> str:
        value = self.get("id")
        if value is None:
            return self.source
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.fail("id", f"must be a string or an integer, got {type(value).__name__}")
            return self.source
        return str(value)

    def messages(self, key: str, value: Any) -> list[dict] | None:
        """A list of {'role', 'content'} messages, checked; None (and an error) otherwise."""
        if not isinstance(value, list) or not value:
            self.fail(key, "must be a non-empty list of messages")
            return None
        ok = True
        out = []
        for i, m in enumerate(value, start=1):
            if not isinstance(m, dict):
                self.fail(key, f"message {i}: must be an object with 'role' and 'content'")
                ok = False
                continue
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                self.fail(key, f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
                ok = False
            if not isinstance(content, str):
                self.fail(key, f"message {i}: 'content' must be a string")
                ok = False
            # Parquet/datasets store absent struct fields as None: drop those keys.
            out.append({k: v for k, v in m.items() if v is not None})
        return out if ok else None

    def text_or_messages(self, key: str) -> tuple[str, Any] | None:
        """('text', str) or ('messages', list); None (and an error) otherwise."""
        value = self.get(key)
        if value is None:
            self.fail(key, "missing")
            return None
        if isinstance(value, str):
            if not value.strip():
                self.fail(key, "must be a non-empty string or a list of messages")
                return None
            return "text", value
        if isinstance(value, list):
            msgs = self.messages(key, value)
            return ("messages", msgs) if msgs is not None else None
        self.fail(key, f"must be a non-empty string or a list of messages, got {type(value).__name__}")
        return None

    def prompt_messages(self, key: str = "prompt") -> list[dict] | None:
        got = self.text_or_messages(key)
        if got is None:
            return None
        kind, value = got
        msgs = [{"role": "user", "content": value}] if kind == "text" else value
        if msgs[-1]["role"] == "assistant":
            self.fail(key, "must not end with an assistant turn (the assistant turn to rank or "
                           "generate comes after it)")
            return None
        if all(m["role"] == "system" for m in msgs):
            self.fail(key, "has only system messages: there is nothing to respond to")
            return None
        return msgs

    def apply_system(self, msgs: list[dict]) -> list[dict]:
        system = self.optional_str("system")
        if system is None:
            return msgs
        if msgs and msgs[0]["role"] == "system":
            self.fail("system", "given, but the conversation already starts with a system message")
            return msgs
        return [{"role": "system", "content": system}] + msgs


def _response(r: Row, key: str, prompt: list[dict] | None, required: bool = True
              ) -> tuple[list[dict] | None, str] | None:
    """The ranked assistant text of `key` and the prompt it answers.

    Text: the prompt is the row's prompt. Messages: `prompt + value` (value alone when the
    row has no prompt: TRL's implicit-prompt form) must end with an assistant turn; the
    conversation before that turn is this response's prompt.
    """
    value = r.get(key)
    if value is None:
        if required:
            r.fail(key, "missing")
        return None
    if isinstance(value, str):
        if not value.strip():
            r.fail(key, "must be a non-empty string or a list of messages")
            return None
        return prompt, value
    if not isinstance(value, list):
        r.fail(key, f"must be a non-empty string or a list of messages, got {type(value).__name__}")
        return None
    msgs = r.messages(key, value)
    if msgs is None:
        return None
    if prompt and msgs[:len(prompt)] == prompt:
        r.fail(key, "repeats the prompt: give the prompt once, in 'prompt' or inside "
                    f"'{key}', not in both (it would be duplicated)")
        return None
    conversation = (prompt or []) + msgs
    last = conversation[-1]
    if last["role"] != "assistant":
        r.fail(key, f"the conversation must end with the assistant turn being ranked, "
                    f"but it ends with a {last['role']!r} turn")
        return None
    if not last["content"].strip():
        r.fail(key, "the ranked assistant turn is empty")
        return None
    return conversation[:-1], last["content"]


def _preference(r: Row) -> Preference | None:
    has_prompt = r.get("prompt") is not None
    prompt = r.prompt_messages() if has_prompt else None
    # With a bad prompt the responses are still checked, so every problem of the row is
    # reported (against no prompt: a list must then end with an assistant turn by itself).
    chosen = _response(r, "chosen", prompt)
    rejected = _response(r, "rejected", prompt)
    edited = _response(r, "edited", prompt, required=False)
    strength = r.optional_str("strength", STRENGTHS)
    capability = r.optional_str("capability")
    rid = r.row_id()
    if r.errors:
        return None
    base = chosen[0]
    if base is None:  # text responses and no prompt field
        r.fail("prompt", "missing: plain-text chosen/rejected need a 'prompt' field")
        return None
    for key, got in (("rejected", rejected), ("edited", edited)):
        if got is not None and got[0] != base:
            r.fail(key, "the conversation before the ranked turn differs from the one in 'chosen'")
            return None
    if not base or all(m["role"] == "system" for m in base):
        r.fail("chosen", "there is no prompt before the ranked assistant turn")
        return None
    if base[-1]["role"] == "assistant":
        r.fail("chosen", "the turn before the ranked assistant turn is also an assistant turn")
        return None
    if rejected[1].strip() == chosen[1].strip():
        r.fail("rejected", "is identical to 'chosen' (a preference needs two different responses)")
        return None
    if edited is not None and edited[1].strip() == chosen[1].strip():
        r.fail("edited", "is identical to 'chosen' (an edit must change the response)")
        return None
    messages = r.apply_system(base)
    if r.errors:
        return None
    return Preference(id=rid, prompt=messages, chosen=chosen[1], rejected=rejected[1],
                      edited=edited[1] if edited else None, strength=strength,
                      capability=capability, source=r.source)


def _sft(r: Row) -> SFTExample | None:
    capability = r.optional_str("capability")
    rid = r.row_id()
    if r.get("messages") is not None:
        msgs = r.messages("messages", r.get("messages"))
        if msgs is None:
            return None
        key = "messages"
    elif r.get("prompt") is not None or r.get("completion") is not None:
        prompt = r.prompt_messages()
        completion = r.get("completion")
        key = "completion"
        if completion is None:
            r.fail(key, "missing")
            return None
        if isinstance(completion, str):
            if not completion.strip():
                r.fail(key, "must be a non-empty string or a list of messages")
                return None
            tail = [{"role": "assistant", "content": completion}]
        elif isinstance(completion, list):
            tail = r.messages(key, completion)
        else:
            r.fail(key, f"must be a non-empty string or a list of messages, got {type(completion).__name__}")
            return None
        if prompt is None or tail is None:
            return None
        msgs = prompt + tail
    else:
        r.fail("messages", "missing: expected 'messages', or 'prompt' and 'completion'")
        return None
    if msgs[-1]["role"] != "assistant":
        r.fail(key, f"the conversation must end with an assistant turn, but it ends with a "
                    f"{msgs[-1]['role']!r} turn")
        return None
    if not msgs[-1]["content"].strip():
        r.fail(key, "the final assistant turn is empty")
        return None
    if all(m["role"] in ("system", "assistant") for m in msgs):
        r.fail(key, "has no user turn before the assistant turn")
        return None
    msgs = r.apply_system(msgs)
    if r.errors:
        return None
    return SFTExample(id=rid, messages=msgs, capability=capability, source=r.source)


_PROMPT_FIELDS = {"prompt", "capability", "system", "id"}
# Unit-test fields of the code reward's test forms (posttrain.reward.code.formats.FORM_FIELDS).
_CODE_TEST_FIELDS = ("tests", "test", "entry_point", "test_list", "test_setup_code", "inputs", "outputs")


def _prompt(r: Row) -> Prompt | None:
    msgs = r.prompt_messages()
    capability = r.optional_str("capability")
    system = r.optional_str("system")
    rid = r.row_id()
    if msgs is None:
        return None
    if system is not None and msgs[0]["role"] == "system":
        r.fail("system", "given, but the prompt already starts with a system message")
    if r.errors:
        return None
    meta = {k: v for k, v in r.data.items() if k not in _PROMPT_FIELDS}
    if any(meta.get(k) is not None for k in _CODE_TEST_FIELDS):
        from posttrain.reward.code.formats import row_problems  # the code reward's own reading of them

        for key, message in row_problems(meta):
            r.fail(key, message)
    if meta.get("instruction_id_list") is not None:
        _check_instructions(r, meta, msgs)
    if r.errors:
        return None
    return Prompt(id=rid, messages=msgs, capability=capability, system=system, meta=meta,
                  source=r.source)


def _check_instructions(r: Row, meta: dict, msgs: list[dict]) -> None:
    """IFEval-style `instruction_id_list` + `kwargs` (posttrain.reward.instructions): ids the
    checkers know, kwargs they take, none they would draw at random. Warnings (what abstains
    here) are for validate-data's report, not errors."""
    from posttrain.reward.instructions import check_row, prompt_text

    for issue in check_row(meta, prompt_text(msgs))[0]:
        if not issue.warning:
            r.fail(issue.field, issue.message)

PARSERS = {"preference": _preference, "sft": _sft, "prompts": _prompt}
