"""Tiny Llama-architecture models and a locally trained tokenizer with a Llama 3 chat template.

Used by the embedded world and by every test: nothing is downloaded. head_dim is 64 so the
vLLM CPU kernels accept the model.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PYTHON_TAG = "<|python_tag|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, EOM, PYTHON_TAG, PAD]

# A Llama 3 style template. The assistant content sits inside {% generation %} markers so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` and TRL's assistant-only loss
# work. A message with `"tool_call": true` ends with <|eom_id|> (Llama 3.1 tool calls).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set end = '<|eom_id|>' if message.get('tool_call') else '<|eot_id|>' %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + end }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + end }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "system user assistant ipython: answer briefly, please.",
    "sort reverse add count the numbers: 12, 7, 3 -> 3, 7, 12",
]


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `corpus`, wrapped as a PreTrainedTokenizerFast.

    Every byte is in the alphabet, so any text encodes. Deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) or _DEFAULT_CORPUS
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,  # generation stops at the end of a turn
        pad_token=PAD,
        additional_special_tokens=[EOS, START_HEADER, END_HEADER, EOM, PYTHON_TAG],
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def tiny_llama_config(tokenizer, *, hidden_size: int = 128, num_layers: int = 2,
                      num_heads: int = 2, num_kv_heads: int = 1, intermediate_size: int | None = None,
                      max_position_embeddings: int = 1024, tie_word_embeddings: bool = True):
    """LlamaConfig for a tiny model. head_dim = hidden_size / num_heads (64 by default)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(EOM)],
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )


def make_tiny_model(tokenizer, seed: int = 0, **config_kwargs):
    """A randomly initialised tiny LlamaForCausalLM (float32), deterministic for `seed`."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(tokenizer, **config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model


# ChatML (Qwen and others): <|im_start|>role\n ... <|im_end|>\n, no begin-of-text token.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def build_chatml_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 1024):
    """Like `build_tokenizer`, with ChatML special tokens and a ChatML chat template
    (tests that chat formatting is derived from the template, not assumed to be Llama 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) or _DEFAULT_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_CHAT_TEMPLATE
    return fast
