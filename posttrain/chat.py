"""Chat rendering, end-of-turn and formatting-token ids, and prompt/response/formatting masks.

Everything here works from the tokenizer's own chat template, so any tokenizer with a
template works; Llama 3 (`<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>`) and
ChatML (`<|im_start|>role\\n ... <|im_end|>\\n`) are the two styles tested.

How a conversation is cut into prompt and targets. The template renders the whole
conversation once and the rendering is tokenized once. A target (assistant) turn starts
where the rendering of the conversation before it *with the generation prompt* ends (that
rendering must be a prefix of the full one, in characters and in token ids, or the template
is unusable for training and `ChatTemplateError` says so), and it ends with the first
end-of-turn token after the turn's content. That token is a target: a model that never
learns to emit it never stops.

Where message contents lie inside the rendering is found by rendering the same
conversation with sentinel contents (the template's skeleton) and matching the real
rendering against it piece by piece; no searching for content strings that could also
occur in headers.
"""

from __future__ import annotations

import bisect
import json
import re
import weakref
from dataclasses import dataclass

LLAMA3_END_OF_TURN = ("<|eot_id|>", "<|eom_id|>")
CHATML_END_OF_TURN = ("<|im_end|>",)
# Tokens that are formatting whenever the vocabulary has them, also when a probe rendering
# does not show them: Llama 3.1 tool calls (<|python_tag|> starts one, <|eom_id|> ends it).
KNOWN_FORMATTING_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|im_start|>", "<|im_end|>")

# Roles a probe conversation tries beyond system/user/assistant; a template that rejects
# one simply does not get it probed.
_OPTIONAL_PROBE_ROLES = ("ipython", "tool")
_SENTINEL = "qzxsentinel{}qzx"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used the way training needs."""


class PromptTooLong(ValueError):
    """The prompt alone does not leave room for one response token within max_length."""

    def __init__(self, prompt_tokens: int, max_length: int):
        self.prompt_tokens = prompt_tokens
        self.max_length = max_length
        super().__init__(
            f"the prompt is {prompt_tokens} tokens, which leaves no room for a response "
            f"within max_length={max_length}"
        )

    def __reduce__(self):
        return (PromptTooLong, (self.prompt_tokens, self.max_length))


@dataclass
class Encoded:
    """One tokenized example. All four lists have the same length; masks hold 0/1.

    prompt_mask = 1 - response_mask (everything that is context, never a target).
    response_mask marks targets: assistant content plus its end-of-turn token.
    formatting_mask marks formatting tokens (see `formatting_token_ids`); the response's
    end-of-turn token is in both response_mask and formatting_mask.
    truncated is True when max_length cut the sequence (the cut part is lost, and with it
    possibly the end-of-turn token).
    """

    input_ids: list[int]
    prompt_mask: list[int]
    response_mask: list[int]
    formatting_mask: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_length(self) -> int:
        """Number of tokens before the first target token."""
        return self.response_mask.index(1) if 1 in self.response_mask else len(self.input_ids)

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Causal-LM labels: the token id at target positions, ignore_index elsewhere."""
        return [t if m else ignore_index for t, m in zip(self.input_ids, self.response_mask)]


# ---------------------------------------------------------------------------- rendering


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the tokenizer has no chat_template; set one (or use a chat model's tokenizer)")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` with a system message first when `system` is given and none is there."""
    messages = list(messages)
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_prompt(tokenizer, messages: list[dict], system: str | None = None) -> str:
    """The chat-template rendering of `messages` followed by the assistant generation prompt.

    `system` is prepended as a system message only when the conversation has none (an
    existing system message wins: it is part of the data).
    """
    return _render(tokenizer, with_system(messages, system), add_generation_prompt=True)


# id(tokenizer) -> (weak reference, {key: value}) of derived facts (end-of-turn ids,
# added-token ids, formatting ids); template-dependent keys include the chat_template.
# Keyed by id with a weak reference rather than a WeakKeyDictionary: hashing a tokenizer
# through one costs more than the lookup is worth on every encode call.
_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def _cache_for(tokenizer) -> dict:
    key = id(tokenizer)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is tokenizer:
        return entry[1]
    ref = weakref.ref(tokenizer, lambda _r, key=key: _CACHE.pop(key, None))
    _CACHE[key] = (ref, {})
    return _CACHE[key][1]


def _token_id(tokenizer, token: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn (what generation stops on).

    Llama 3: <|eot_id|> and <|eom_id|> (the latter ends a tool call). ChatML: <|im_end|>.
    Otherwise the tokenizer's eos token.
    """
    cache = _cache_for(tokenizer)
    key = ("eot", tokenizer.chat_template)
    if key not in cache:
        cache[key] = tuple(_end_of_turn_ids(tokenizer))
    return list(cache[key])


def _end_of_turn_ids(tokenizer) -> list[int]:
    for names in (LLAMA3_END_OF_TURN, CHATML_END_OF_TURN):
        ids = [i for i in (_token_id(tokenizer, n) for n in names) if i is not None]
        if ids:
            return ids
    derived = _template_end_of_turn(tokenizer)
    if derived is not None:
        return [derived]
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError("the tokenizer has no end-of-turn token and no eos token")
    return [tokenizer.eos_token_id]


def _template_end_of_turn(tokenizer) -> int | None:
    """The first added/special token the template writes after an assistant message's
    content (Gemma's <end_of_turn>, Phi-3's <|end|>, Mistral's </s>), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    rendered = _render(tokenizer, msgs, add_generation_prompt=False)
    end = _content_spans(tokenizer, msgs, rendered, add_generation_prompt=False)[1][1]
    ids, offsets = _tokenize(tokenizer, rendered)
    added = _added_token_ids(tokenizer)
    return next((t for t, (s, _) in zip(ids, offsets) if s >= end and t in added), None)


# ------------------------------------------------------------------- locating contents


def _tokenize_many(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) per text."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("posttrain.chat needs a fast tokenizer (character offsets)")
    # The template already wrote begin-of-text; letting the tokenizer add it would double it.
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(list(i), [tuple(o) for o in offs])
            for i, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    return _tokenize_many(tokenizer, [text])[0]


_SKELETON_LIMIT = 4096


def _skeleton_pieces(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list:
    """The template's rendering with sentinel contents, split at the sentinels:
    [text0, idx0, text1, idx1, ..., textN]. It depends on the messages' roles and other
    keys, not their contents, so it is cached per tokenizer on those."""
    shape = json.dumps([{k: v for k, v in m.items() if k != "content"} for m in messages],
                       sort_keys=True, default=str)
    cache = _cache_for(tokenizer).setdefault(("skeleton", tokenizer.chat_template), {})
    key = (shape, add_generation_prompt)
    if key not in cache:
        if len(cache) >= _SKELETON_LIMIT:
            cache.clear()
        probe = [dict(m, content=_SENTINEL.format(i)) for i, m in enumerate(messages)]
        skeleton = _render(tokenizer, probe, add_generation_prompt)
        cache[key] = re.split(r"qzxsentinel(\d+)qzx", skeleton)
    return cache[key]


def _content_spans(tokenizer, messages: list[dict], rendered: str,
                   add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Character span of each message's content inside `rendered` (same order as messages).

    The skeleton (the rendering with sentinel contents) gives the template text between
    contents; the real rendering must be that text with each content (as is, stripped, or
    JSON-escaped) in place of the sentinels.
    """
    pieces = _skeleton_pieces(tokenizer, messages, add_generation_prompt)
    # pieces = [text0, idx0, text1, idx1, ..., textN]
    spans: list[tuple[int, int] | None] = [None] * len(messages)
    if not rendered.startswith(pieces[0]):
        raise ChatTemplateError("the chat template renders differently for different contents; "
                                "posttrain cannot locate message contents in it")
    pos = len(pieces[0])
    for k in range(1, len(pieces), 2):
        idx, after = int(pieces[k]), pieces[k + 1]
        content = messages[idx].get("content") or ""
        # as is; stripped (`| trim`); JSON-escaped without its quotes (`| tojson`, which
        # Llama 3.1 templates apply to tool results)
        variants = (content, content.strip(), json.dumps(content, ensure_ascii=False)[1:-1])
        for variant in variants:
            end = pos + len(variant)
            if rendered.startswith(variant, pos) and rendered.startswith(after, end):
                spans[idx] = (pos, end)
                pos = end + len(after)
                break
        else:
            raise ChatTemplateError(
                f"cannot locate the content of message {idx + 1} ({messages[idx].get('role')}) in "
                "the rendering: the chat template transforms it in a way posttrain does not handle"
            )
    # A template may drop a message (e.g. an unused system prompt); its span is empty.
    return [s if s is not None else (0, 0) for s in spans]


def _overlaps(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    a, b = span
    return any(a < e and s < b for s, e in spans if e > s)


# ------------------------------------------------------------------ formatting tokens

def _added_token_ids(tokenizer) -> set[int]:
    cache = _cache_for(tokenizer)
    if "added" not in cache:
        cache["added"] = frozenset(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | frozenset(
            tokenizer.all_special_ids)
    return cache["added"]


def _probe_conversations() -> list[list[dict]]:
    base = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "v"},
        {"role": "assistant", "content": "b"},
    ]
    out = [base, base[1:]]
    for role in _OPTIONAL_PROBE_ROLES:
        out.append(base[1:3] + [{"role": role, "content": "t"}, {"role": "assistant", "content": "c"}])
    # Llama 3.1 style tool call (the tiny template ends it with <|eom_id|>).
    out.append(base[1:2] + [{"role": "assistant", "content": "c", "tool_call": True},
                            {"role": "ipython", "content": "r"}, {"role": "assistant", "content": "d"}])
    return out


def _is_role_run(text: str, roles: set[str]) -> bool:
    """A stretch of ordinary template tokens that is structure: whitespace, or a role name
    (with at most header punctuation around it, e.g. 'user\\n' in ChatML)."""
    core = re.sub(r"[\s<|>:\[\]#/]", "", text).lower()
    return core == "" or core in roles


def _derive_formatting_ids(tokenizer) -> set[int]:
    from jinja2.exceptions import TemplateError

    added = _added_token_ids(tokenizer)
    found: set[int] = set()
    for n, conv in enumerate(_probe_conversations()):
        try:
            for gen in (False, True):
                msgs = conv[:-1] if gen else conv
                rendered = _render(tokenizer, msgs, add_generation_prompt=gen)
                spans = _content_spans(tokenizer, msgs, rendered, gen)
                ids, offsets = _tokenize(tokenizer, rendered)
                # Gemma names the assistant "model" in its headers
                roles = {m["role"] for m in msgs} | {"assistant", "model"}
                found |= _structure_ids(tokenizer, ids, offsets, spans, added, roles)
        except (TemplateError, ValueError, KeyError, TypeError) as err:
            # Templates may refuse a system role or a tool role; only the plain
            # user/assistant conversation (probe 1) is required to render.
            if n == 1:
                raise ChatTemplateError(
                    f"the chat template fails on a plain user/assistant conversation: {err}"
                ) from err
    return found


def _structure_ids(tokenizer, ids, offsets, spans, added, roles) -> set[int]:
    """Ids of template tokens that are structure: every added/special token outside the
    contents, and runs of ordinary tokens between them that are whitespace or a role name.
    Ordinary template text that is neither (an injected date line, a default system
    prompt) is not formatting."""
    out: set[int] = set()
    run: list[int] = []

    def close_run():
        if run:
            text = tokenizer.decode(run, clean_up_tokenization_spaces=False)
            if _is_role_run(text, roles):
                out.update(run)
            run.clear()

    for tid, off in zip(ids, offsets):
        if _overlaps(off, spans):
            close_run()
        elif tid in added:
            close_run()
            out.add(tid)
        else:
            run.append(tid)
    close_run()
    return out


def formatting_token_ids(tokenizer, override: list[str] | None = None) -> set[int]:
    """The formatting tokens: header tokens, role names inside headers, termination tokens,
    begin-of-text (and the whitespace the template puts around them).

    Derived by rendering probe conversations with sentinel contents and keeping the template
    tokens that are structure (see `_structure_ids`), plus the end-of-turn ids and known
    Llama 3 / ChatML specials present in the vocabulary (<|python_tag|>, <|eom_id|>).

    Note: ordinary tokens such as "\\n" or "user" are in the set because headers use them;
    they also occur in contents. Use `Encoded.formatting_mask`, which counts them only
    outside message contents, rather than matching ids over a whole sequence.

    `override`: token strings (vocabulary spelling such as 'Ċ', or text that encodes to one
    token) that replace the derivation. One that is not a single token is an error.
    """
    key = ("formatting", tokenizer.chat_template, tuple(override) if override is not None else None)
    per_tok = _cache_for(tokenizer)
    if key in per_tok:
        return set(per_tok[key])
    if override is not None:
        result = {_single_token_id(tokenizer, s) for s in override}
    else:
        result = _derive_formatting_ids(tokenizer)
        result |= set(end_of_turn_ids(tokenizer))
        result |= {i for i in (_token_id(tokenizer, t) for t in KNOWN_FORMATTING_TOKENS) if i is not None}
        if tokenizer.bos_token_id is not None and tokenizer.bos_token_id in _added_token_ids(tokenizer):
            # begin-of-text belongs even when the template leaves it to the tokenizer
            result.add(tokenizer.bos_token_id)
    per_tok[key] = frozenset(result)
    return set(result)


def _single_token_id(tokenizer, token: str) -> int:
    tid = _token_id(tokenizer, token)
    if tid is not None:
        return tid
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"formatting token override {token!r} is not a single token in this tokenizer's "
            f"vocabulary (it encodes to {len(ids)} tokens)"
        )
    return ids[0]


# --------------------------------------------------------------------------- encoding


def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i + 1} is not a {{'role', 'content'}} dict: {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i + 1} ({m['role']}): content must be a string")


def _encode(tokenizer, messages: list[dict], targets: list[int], max_length: int | None,
            formatting_tokens: list[str] | None, cut_after_last_target: bool) -> Encoded:
    """Tokenize `messages` once; the assistant turns at indices `targets` become targets."""
    _check_messages(messages)
    for t in targets:
        if messages[t]["role"] != "assistant":
            raise ValueError(f"message {t + 1} is a target but its role is {messages[t]['role']!r}")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _content_spans(tokenizer, messages, full, add_generation_prompt=False)
    prefixes = [_render(tokenizer, messages[:t], add_generation_prompt=True) for t in targets]
    for t, prefix in zip(targets, prefixes):
        if not full.startswith(prefix):
            raise ChatTemplateError(
                f"the rendering of the conversation before message {t + 1} with the generation "
                "prompt is not a prefix of the full rendering; this chat template cannot be "
                "used to mask prompts"
            )
    # One batched call tokenizes the conversation and every prompt prefix alone: the prefix
    # alone is what generation sees, so it must tokenize as it does inside the whole.
    (ids, offsets), *prefix_ids = _tokenize_many(tokenizer, [full] + prefixes)
    eot = set(end_of_turn_ids(tokenizer))
    fmt_ids = formatting_token_ids(tokenizer, formatting_tokens)
    added = _added_token_ids(tokenizer)

    response = [0] * len(ids)
    end_tok = len(ids)
    for t, prefix, (p_ids, _) in zip(targets, prefixes, prefix_ids):
        start = _first_token_at(offsets, len(prefix))
        if ids[:start] != p_ids:
            raise ChatTemplateError(
                f"the prompt before message {t + 1} tokenizes differently alone than inside the "
                "full conversation (a token crosses the prompt/response boundary)"
            )
        content_end = spans[t][1]
        stop = next((k for k in range(start, len(ids))
                     if ids[k] in eot and offsets[k][0] >= content_end), None)
        if stop is None:
            raise ChatTemplateError(
                f"no end-of-turn token {sorted(eot)} after assistant message {t + 1}: the chat "
                "template does not close assistant turns"
            )
        for k in range(start, stop + 1):
            response[k] = 1
        end_tok = stop + 1
    if cut_after_last_target and targets:
        # Template text after the last end-of-turn (ChatML's trailing newline) is never
        # generated: drop it rather than train on or attend to it.
        ids, offsets, response = ids[:end_tok], offsets[:end_tok], response[:end_tok]

    formatting = [
        1 if tid in fmt_ids and (tid in added or not _overlaps(off, spans)) else 0
        for tid, off in zip(ids, offsets)
    ]
    truncated = False
    if max_length is not None and len(ids) > max_length:
        first_target = response.index(1) if 1 in response else len(ids)
        if first_target >= max_length:
            raise PromptTooLong(first_target, max_length)
        ids, response, formatting = ids[:max_length], response[:max_length], formatting[:max_length]
        truncated = True
    return Encoded(
        input_ids=ids,
        prompt_mask=[1 - r for r in response],
        response_mask=response,
        formatting_mask=formatting,
        truncated=truncated,
    )


def _first_token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the first token starting at or after `char` (start offsets never decrease)."""
    return bisect.bisect_left(offsets, char, key=lambda o: o[0])


def encode_example(tokenizer, prompt_messages: list[dict], response: str,
                   max_length: int | None = None, *, system: str | None = None,
                   formatting_tokens: list[str] | None = None) -> Encoded:
    """Tokenize prompt + one assistant response; the response is the only target.

    prompt = everything up to and including the assistant header (the generation prompt),
    earlier assistant turns included; response = the assistant content and its end-of-turn
    token. The sequence ends with that token (template text after it is dropped).

    max_length: a longer example has its response cut from the right (`truncated=True`; the
    end-of-turn token may be lost); a prompt that leaves no room for one response token
    raises `PromptTooLong`.

    formatting_mask: ids in `formatting_token_ids(tokenizer, formatting_tokens)`, counted
    outside message contents only, except added/special tokens (e.g. <|python_tag|> opening
    a tool call) which count anywhere.
    """
    messages = with_system(prompt_messages, system) + [{"role": "assistant", "content": response}]
    return _encode(tokenizer, messages, [len(messages) - 1], max_length, formatting_tokens,
                   cut_after_last_target=True)


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None = None, *,
                        formatting_tokens: list[str] | None = None) -> Encoded:
    """Tokenize a whole conversation; every assistant turn (content + end-of-turn) is a target.

    Everything else (system, user, tool turns, headers) is context. Template text after the
    last assistant turn's end-of-turn token is dropped. max_length cuts from the right
    (`truncated=True`); if no target token fits, `PromptTooLong`.
    """
    targets = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not targets:
        raise ValueError("the conversation has no assistant turn to train on")
    return _encode(tokenizer, list(messages), targets, max_length, formatting_tokens,
                   cut_after_last_target=True)
