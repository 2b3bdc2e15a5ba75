"""What an annotator's `edited` response may hold before it becomes a preference row.

An edit is free text that the next round trains on as the best response (edited > chosen >
rejected, in the reward model and in DPO). Two things would poison that:

- **the tokenizer's special or formatting tokens** (`<|eot_id|>`, `<|start_header_id|>`,
  `<|im_end|>`): tokenized inside a response they end the turn early or open a new header,
  teaching the model the chat format's structure as content. Refused: every added or
  special token of the policy's tokenizer, the markers its chat template spells out, and
  the well-known markers of other chat formats (posttrain.chat.KNOWN_FORMATTING_TOKENS).
- **size**: an edit longer (in the policy's tokens) than `max_tokens` cannot fit the
  training that reads it. The limit is the smaller of `rm.max_length` and `dpo.max_length`
  of the round that trains on the batch (the RM drops, DPO truncates a longer example).
  A label file is read line by line with a byte cap per line derived from that limit
  (`row_bytes`), so a 180 MB edit is refused without being read whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BYTES_PER_TOKEN = 16
"""Bytes one token may take in a label row (UTF-8 and JSON escapes included); with
ROW_MARGIN, the byte cap of a row whose edit has `max_tokens` tokens."""
ROW_MARGIN = 64 << 10
"""Bytes of a label row besides its edit (id, pair hash, reason, annotator)."""

_TEMPLATE_MARKERS = re.compile(r"<\|[^|<>\s]{1,60}\|>|\[/?INST\]|<(?:start|end)_of_turn>|<\|?(?:end|eos|bos)\|?>")
"""Marker spellings a chat template writes literally (Llama 3, ChatML, Mistral, Gemma)."""


def reserved_markers(tokenizer) -> list[str]:
    """The strings an edit may not contain: the tokenizer's added and special tokens (not
    plain whitespace), the markers its chat template writes, and the known markers of other
    chat formats. Longest first."""
    from posttrain.chat import KNOWN_FORMATTING_TOKENS

    found = set(KNOWN_FORMATTING_TOKENS)
    if tokenizer is not None:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        found |= {str(t) for t in decoder.values()}
        found |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str):
            found |= set(_TEMPLATE_MARKERS.findall(template))
    return sorted((m for m in found if m.strip() and len(m) > 1), key=lambda m: (-len(m), m))


@dataclass
class EditCheck:
    """Checks one round's edits: `problem(text)` is None for an acceptable edit."""

    tokenizer: object | None
    """The policy's tokenizer (None: only the known markers and the byte cap are checked)."""
    max_tokens: int
    limit_source: str
    """Where `max_tokens` comes from, for the message (e.g. `rm.max_length of round 2`)."""

    def __post_init__(self):
        self.markers = reserved_markers(self.tokenizer)

    @property
    def row_bytes(self) -> int:
        return self.max_tokens * BYTES_PER_TOKEN + ROW_MARGIN

    def too_long(self) -> str:
        """Added to the message of a label row over `row_bytes`."""
        return f" (an edit may have at most {self.max_tokens} tokens: {self.limit_source})"

    def problem(self, text: str) -> str | None:
        for marker in self.markers:
            if marker in text:
                return (f"holds {marker!r}, a special or formatting token of the chat format: trained on as "
                        "part of a response it would teach the model the format's structure; remove it")
        size = len(text.encode("utf-8"))
        if size > self.row_bytes:
            return f"is {size} bytes long{self.too_long()}"
        if self.tokenizer is not None:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > self.max_tokens:
                return f"is {n} tokens long{self.too_long()}"
        return None


def edit_check_for(model: str | None, max_tokens: int, limit_name: str, *,
                   trust_remote_code: bool = False) -> EditCheck:
    """The edit check for labels of `model`'s responses (the policy whose responses were
    labelled): its tokenizer's special and formatting tokens, and at most `max_tokens` tokens
    (`limit_name`: the recipe key that sets it, for messages)."""
    tokenizer = None
    if model and Path(model).is_dir():
        from posttrain.modeling import load_tokenizer

        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    return EditCheck(tokenizer, max_tokens, limit_name)
