"""Chat rendering and masks, checked token by token against hand-written expectations for
a Llama 3 style template and a ChatML template (both tiny tokenizers built in-process)."""

from __future__ import annotations

import copy

import pytest

from posttrain import chat
from posttrain.world.tiny import build_chatml_tokenizer

# Token spellings of the tiny byte-level vocabulary ('Ċ' is "\n", 'Ġ' a leading space).
# "assistant" is three tokens in this vocabulary: a / ss / istant.
ASSISTANT = ["a", "ss", "istant"]


@pytest.fixture(scope="module")
def chatml():
    return build_chatml_tokenizer()


def table(tok, enc: chat.Encoded) -> list[tuple[str, str]]:
    """(token, flags) per position; flags: P prompt, R response, F formatting."""
    assert len(enc.input_ids) == len(enc.prompt_mask) == len(enc.response_mask) == len(enc.formatting_mask)
    out = []
    for tid, p, r, f in zip(enc.input_ids, enc.prompt_mask, enc.response_mask, enc.formatting_mask):
        assert p + r == 1
        out.append((tok.convert_ids_to_tokens(tid), ("P" if p else "R") + ("F" if f else "")))
    return out


def toks(tok, ids) -> set[str]:
    return {tok.convert_ids_to_tokens(i) for i in ids}


# ------------------------------------------------------------------------- Llama 3 style


def test_llama3_formatting_and_end_of_turn(tiny_tokenizer):
    assert toks(tiny_tokenizer, chat.end_of_turn_ids(tiny_tokenizer)) == {"<|eot_id|>", "<|eom_id|>"}
    got = toks(tiny_tokenizer, chat.formatting_token_ids(tiny_tokenizer))
    assert got == {
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
        "<|eom_id|>", "<|python_tag|>", "Ċ",
        "system", "user", *ASSISTANT, "ip", "ython",  # role names inside headers
        "t", "o", "l",  # the role name "tool", probed because the template accepts it
    }
    # Not formatting: padding and end-of-text are never rendered by the template.
    assert "<|finetune_right_pad_id|>" not in got and "<|end_of_text|>" not in got


def test_llama3_single_turn_masks(tiny_tokenizer):
    # The response contains "\n" and "user", ids that are formatting inside headers: inside
    # the content they are not formatting.
    enc = chat.encode_example(tiny_tokenizer, [{"role": "user", "content": "hi"}], "ok\nuser")
    assert table(tiny_tokenizer, enc) == [
        ("<|begin_of_text|>", "PF"),
        ("<|start_header_id|>", "PF"), ("user", "PF"), ("<|end_header_id|>", "PF"),
        ("Ċ", "PF"), ("Ċ", "PF"),
        ("h", "P"), ("i", "P"), ("<|eot_id|>", "PF"),
        ("<|start_header_id|>", "PF"), *[(t, "PF") for t in ASSISTANT], ("<|end_header_id|>", "PF"),
        ("Ċ", "PF"), ("Ċ", "PF"),
        ("o", "R"), ("k", "R"), ("Ċ", "R"), ("user", "R"),
        ("<|eot_id|>", "RF"),  # end-of-turn: a target and a formatting token
    ]
    assert not enc.truncated
    assert enc.prompt_length == 16
    assert enc.labels()[:16] == [-100] * 16 and enc.labels()[16:] == enc.input_ids[16:]


def test_render_prompt_system(tiny_tokenizer):
    user = [{"role": "user", "content": "x"}]
    gen = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert chat.render_prompt(tiny_tokenizer, user, system="S") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>" + gen
    )
    # An existing system message is data and wins over the given one.
    with_sys = [{"role": "system", "content": "mine"}] + user
    assert chat.render_prompt(tiny_tokenizer, with_sys, system="S") == chat.render_prompt(tiny_tokenizer, with_sys)
    assert "mine" in chat.render_prompt(tiny_tokenizer, with_sys, system="S")


def test_llama3_multi_turn_every_assistant_turn_is_a_target(tiny_tokenizer):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "4"},
        {"role": "assistant", "content": "sure"},
    ]
    enc = chat.encode_conversation(tiny_tokenizer, msgs)
    header = lambda role, flag="PF": [("<|start_header_id|>", flag), *[(t, flag) for t in role],  # noqa: E731
                                      ("<|end_header_id|>", flag), ("Ċ", flag), ("Ċ", flag)]
    assert table(tiny_tokenizer, enc) == [
        ("<|begin_of_text|>", "PF"),
        *header(["system"]), ("b", "P"), ("e", "P"), ("Ġbrief", "P"), ("<|eot_id|>", "PF"),
        *header(["user"]), ("h", "P"), ("i", "P"), ("<|eot_id|>", "PF"),
        *header(ASSISTANT), ("o", "R"), ("k", "R"), ("<|eot_id|>", "RF"),
        *header(["user"]), ("4", "P"), ("<|eot_id|>", "PF"),
        *header(ASSISTANT), ("s", "R"), ("u", "R"), ("r", "R"), ("e", "R"), ("<|eot_id|>", "RF"),
    ]
    # encode_example on the same conversation: only the last turn is a target.
    one = chat.encode_example(tiny_tokenizer, msgs[:-1], "sure")
    assert one.input_ids == enc.input_ids
    assert sum(one.response_mask) == 5 and one.response_mask[-5:] == [1] * 5


def test_llama3_tool_call_and_ipython(tiny_tokenizer):
    # Llama 3.1 tool use: the assistant's call starts with <|python_tag|> and ends with
    # <|eom_id|>; the tool's answer comes back as an ipython turn.
    msgs = [
        {"role": "user", "content": "4"},
        {"role": "assistant", "content": "<|python_tag|>call", "tool_call": True},
        {"role": "ipython", "content": "result"},
        {"role": "assistant", "content": "done"},
    ]
    enc = chat.encode_conversation(tiny_tokenizer, msgs)
    rows = table(tiny_tokenizer, enc)
    head = lambda role: [("<|start_header_id|>", "PF"), *[(t, "PF") for t in role],  # noqa: E731
                         ("<|end_header_id|>", "PF"), ("Ċ", "PF"), ("Ċ", "PF")]
    assert rows == [
        ("<|begin_of_text|>", "PF"),
        *head(["user"]), ("4", "P"), ("<|eot_id|>", "PF"),
        # the call: python_tag is formatting even inside the content; "a", "l" are not
        *head(ASSISTANT), ("<|python_tag|>", "RF"), ("c", "R"), ("a", "R"), ("l", "R"), ("l", "R"),
        ("<|eom_id|>", "RF"),
        *head(["ip", "ython"]), ("r", "P"), ("e", "P"), ("s", "P"), ("u", "P"), ("l", "P"), ("t", "P"),
        ("<|eot_id|>", "PF"),
        *head(ASSISTANT), ("do", "R"), ("n", "R"), ("e", "R"), ("<|eot_id|>", "RF"),
    ]


def test_truncation_and_prompt_too_long(tiny_tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    full = chat.encode_example(tiny_tokenizer, prompt, "The answer is 4.")
    assert full.prompt_length == 16 and len(full) == 16 + 7 + 1
    cut = chat.encode_example(tiny_tokenizer, prompt, "The answer is 4.", max_length=19)
    assert cut.truncated and len(cut) == 19
    assert cut.input_ids == full.input_ids[:19]
    assert cut.response_mask == [0] * 16 + [1] * 3  # response cut from the right, eot lost
    same = chat.encode_example(tiny_tokenizer, prompt, "The answer is 4.", max_length=24)
    assert not same.truncated and same.input_ids == full.input_ids
    with pytest.raises(chat.PromptTooLong, match="the prompt is 16 tokens, which leaves no room"):
        chat.encode_example(tiny_tokenizer, prompt, "x", max_length=16)
    import pickle

    err = pickle.loads(pickle.dumps(chat.PromptTooLong(16, 16)))
    assert (err.prompt_tokens, err.max_length) == (16, 16)
    # One response token fits: allowed.
    assert len(chat.encode_example(tiny_tokenizer, prompt, "ok", max_length=17)) == 17


def test_override(tiny_tokenizer):
    ids = chat.formatting_token_ids(tiny_tokenizer, override=["<|eot_id|>", "Ċ", "\n"])
    assert toks(tiny_tokenizer, ids) == {"<|eot_id|>", "Ċ"}  # vocab spelling or text of one token
    enc = chat.encode_example(tiny_tokenizer, [{"role": "user", "content": "hi"}], "ok",
                              formatting_tokens=["<|eot_id|>"])
    flagged = [tiny_tokenizer.convert_ids_to_tokens(t) for t, f in zip(enc.input_ids, enc.formatting_mask) if f]
    assert flagged == ["<|eot_id|>", "<|eot_id|>"]
    with pytest.raises(ValueError, match=r"formatting token override '<\|nope\|>' is not a single token"):
        chat.formatting_token_ids(tiny_tokenizer, override=["<|eot_id|>", "<|nope|>"])


def test_template_that_breaks_the_prefix_is_an_error(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # The generation prompt opens a thinking block the full rendering does not have.
    tok.chat_template = tok.chat_template.replace(
        "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
        "'<|start_header_id|>assistant<|end_header_id|>\\n\\nthink:' }}",
    )
    assert chat.render_prompt(tok, [{"role": "user", "content": "hi"}]).endswith("think:")
    with pytest.raises(chat.ChatTemplateError, match="is not a prefix of the full rendering"):
        chat.encode_example(tok, [{"role": "user", "content": "hi"}], "ok")


# ------------------------------------------------------------------------------ ChatML


def test_chatml_formatting_and_end_of_turn(chatml):
    assert toks(chatml, chat.end_of_turn_ids(chatml)) == {"<|im_end|>"}
    assert toks(chatml, chat.formatting_token_ids(chatml)) == {
        "<|im_start|>", "<|im_end|>", "Ċ",  # the newline after the role and after each turn
        "system", "user", *ASSISTANT, "ip", "ython", "t", "o", "l",
    }


def test_chatml_single_turn_masks(chatml):
    enc = chat.encode_example(chatml, [{"role": "user", "content": "hi"}], "ok\nuser", system="be brief")
    assert table(chatml, enc) == [
        ("<|im_start|>", "PF"), ("system", "PF"), ("Ċ", "PF"),
        ("b", "P"), ("e", "P"), ("Ġbrief", "P"), ("<|im_end|>", "PF"), ("Ċ", "PF"),
        ("<|im_start|>", "PF"), ("user", "PF"), ("Ċ", "PF"),
        ("h", "P"), ("i", "P"), ("<|im_end|>", "PF"), ("Ċ", "PF"),
        ("<|im_start|>", "PF"), *[(t, "PF") for t in ASSISTANT], ("Ċ", "PF"),
        ("o", "R"), ("k", "R"), ("Ċ", "R"), ("user", "R"),
        ("<|im_end|>", "RF"),
        # the template's "\n" after the last <|im_end|> is never generated: dropped
    ]


def test_chatml_multi_turn(chatml):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "4"},
        {"role": "assistant", "content": "sure"},
    ]
    rows = table(chatml, chat.encode_conversation(chatml, msgs))
    turn = lambda role: [("<|im_start|>", "PF"), *[(t, "PF") for t in role], ("Ċ", "PF")]  # noqa: E731
    assert rows == [
        *turn(["user"]), ("h", "P"), ("i", "P"), ("<|im_end|>", "PF"), ("Ċ", "PF"),
        *turn(ASSISTANT), ("o", "R"), ("k", "R"), ("<|im_end|>", "RF"),
        ("Ċ", "PF"),  # between turns: context, not a target
        *turn(["user"]), ("4", "P"), ("<|im_end|>", "PF"), ("Ċ", "PF"),
        *turn(ASSISTANT), ("s", "R"), ("u", "R"), ("r", "R"), ("e", "R"), ("<|im_end|>", "RF"),
    ]


def test_no_assistant_turn_is_an_error(chatml):
    with pytest.raises(ValueError, match="no assistant turn"):
        chat.encode_conversation(chatml, [{"role": "user", "content": "hi"}])


# --------------------------------------------------------- a third style, derived only

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def gemma_like():
    """A tokenizer whose specials chat.py has no names for: everything must come from the
    template (which also refuses system and tool roles, as Gemma's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    tok.train_from_iterator(["user model answer the numbers 1 2 3"], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", additional_special_tokens=specials[3:])
    fast.chat_template = GEMMA_TEMPLATE
    return fast


def test_template_derived_end_of_turn_and_formatting(gemma_like):
    tok = gemma_like
    assert toks(tok, chat.end_of_turn_ids(tok)) == {"<end_of_turn>"}  # not <eos>
    model = tok.tokenize("model")
    assert toks(tok, chat.formatting_token_ids(tok)) == {
        "<bos>", "<start_of_turn>", "<end_of_turn>", "Ċ", *tok.tokenize("user"), *model}
    enc = chat.encode_example(tok, [{"role": "user", "content": "1"}], "2")
    assert table(tok, enc) == [
        ("<bos>", "PF"), ("<start_of_turn>", "PF"), *[(t, "PF") for t in tok.tokenize("user")], ("Ċ", "PF"),
        ("1", "P"), ("<end_of_turn>", "PF"), ("Ċ", "PF"),
        ("<start_of_turn>", "PF"), *[(t, "PF") for t in model], ("Ċ", "PF"),
        ("2", "R"), ("<end_of_turn>", "RF"),
    ]


def test_injected_template_text_and_json_escaped_tool_results(tiny_tokenizer):
    """Llama 3.1 style templates write a fixed preamble into the system turn and JSON-escape
    tool results: the preamble is not formatting, escaped contents are still located."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{{- bos_token }}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nquick brown fox\\n\\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
        "{%- set messages = messages[1:] %}{%- endif %}"
        "{{- '<|eot_id|>' }}"
        "{%- for m in messages %}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if m['role'] == 'ipython' %}{{- m['content'] | tojson }}{%- else %}{{- m['content'] }}{%- endif %}"
        "{{- '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    )
    fmt = toks(tok, chat.formatting_token_ids(tok))
    assert not fmt & set(tok.tokenize("quick brown fox"))  # injected text: not formatting
    msgs = [{"role": "user", "content": "4"}, {"role": "ipython", "content": 'say "x"'},
            {"role": "assistant", "content": "ok"}]
    rows = table(tok, chat.encode_conversation(tok, msgs))
    body = rows[rows.index(("ython", "PF")) + 4:-11]  # after "<|end_header_id|>\n\n"
    assert [t for t, _ in body] == tok.tokenize('"say \\"x\\""')  # the tojson rendering
    assert {flag for _, flag in body} == {"P"}  # context, and not formatting
    assert rows[-3:] == [("o", "R"), ("k", "R"), ("<|eot_id|>", "RF")]
