"""Every bad input tried against posttrain (issue 15) gets a clear error naming the file (and
the recipe key or row), an exit code of 1, and neither a traceback nor a hang.

Stored inputs are in tests/bad_inputs/; the ones that cannot be stored (huge, special files)
are made here. Recipes go through `posttrain validate`, data through `posttrain validate-data`
and the loader the stages use: both must say not-OK, with the same message.
"""

import json
import os
import re
import signal
from pathlib import Path

import pytest

from posttrain import data
from posttrain.cli import main
from posttrain.recipe import RecipeError, load_recipe

CORPUS = Path(__file__).parent / "bad_inputs"


@pytest.fixture(autouse=True)
def no_hang():
    """A hang fails the test instead of stalling the suite."""
    def on_alarm(signum, frame):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def validate(capsys, *args) -> tuple[int, str]:
    code = main(["validate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err


RECIPES = {
    "recipe_os_system.yaml": r"reward\.target: reward target 'os:system' is a function, not a reward class",
    "recipe_subprocess_run.yaml": r"reward\.target: reward target 'subprocess:run' is a function",
    "recipe_checker_not_a_reward.yaml": r"eval\.checker\.target: .*extract_code' is a function",
    "recipe_nested_not_a_reward.yaml": r"reward\.kwargs\.components\[1\]\[0\]\.target: .*'shutil:rmtree'",
    "recipe_unknown_target.yaml": r"reward\.target: .*cannot import module 'no_such_package\.rewards'",
    "recipe_missing_sft.yaml": r"data\.sft\[0\]: 'no_such\.jsonl': no such file",
    "recipe_world_no_such.yaml": r"data\.prompts\[0\]\.path: 'world:no_such': not in the embedded world",
    "recipe_k_true.yaml": r"sample\.k: Value error, expected a number, got true",
    "recipe_override_reversed.yaml": r"overrides\.7-3: the range ends before it starts",
    "recipe_override_past_rounds.yaml": r"overrides\.99: round 99 is past the recipe's last round \(6\)",
    "recipe_alias_bomb.yaml": r"more than 100000 values once YAML aliases are expanded",
    "recipe_deep_nesting.yaml": r"nested (too deep to read|deeper than 32 levels)",
    # issue 25: every number finite and bounded (posttrain.schema), every model path checked
    "recipe_beta_inf.yaml": r"dpo\.beta: Input should be a finite number \(got inf\)",
    "recipe_lr_nan.yaml": r"sft\.learning_rate: Input should be a finite number \(got nan\)",
    "recipe_margin_nan.yaml": r"rm\.margins\.better: Input should be a finite number \(got nan\)",
    "recipe_batch_size_zero.yaml": r"rm\.batch_size: Input should be greater than or equal to 1 \(got 0\)",
    "recipe_k_100000.yaml": r"sample\.k: Input should be less than or equal to 1024 \(got 100000\)",
    "recipe_length_1e9.yaml": r"sft\.max_length: Input should be less than or equal to 2097152 \(got 1000000000\)",
    "recipe_epochs_1e6.yaml": r"dpo\.epochs: Input should be less than or equal to 1000 \(got 1000000\.0\)",
    "recipe_rounds_million.yaml": r"rounds: Input should be less than or equal to 100 \(got 1000000\)",
    "recipe_base_missing.yaml": r"models\.base: 'no_such_checkpoint_folder': no such model folder \(.*\) "
                                r"\(a hub id is written owner/name\)",
    "recipe_policy_hub_not_cached.yaml": r"models\.initial_policy: 'posttrain-tests/not-a-cached-model': not a local "
                                         r"folder, and a hub id that is not in the local cache .*HF_HUB_OFFLINE=1",
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_bad_recipe(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, err = validate(capsys, CORPUS / name)
    assert code == 1, err
    assert str(CORPUS / name) in err
    assert re.search(RECIPES[name], err), err
    assert "Traceback" not in err
    assert not (tmp_path / "MARKER").exists()


def test_corpus_and_table_agree():
    stored = {p.name for p in CORPUS.glob("recipe_*.yaml")}
    assert stored == set(RECIPES)
    stored = {p.name for p in CORPUS.iterdir() if not p.name.startswith(("recipe_", "README"))}
    assert stored == set(DATA)


def test_recipe_that_is_a_folder(capsys, tmp_path):
    folder = tmp_path / "recipe.yaml"
    folder.mkdir()
    code, err = validate(capsys, folder)
    assert code == 1 and f"{folder}: is a folder, not a recipe file" in err


def test_recipe_too_large(capsys, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("name: big\nmodels: {base: world:base_model}\ndescription: " + "x" * (50 << 20) + "\n")
    code, err = validate(capsys, big)
    assert code == 1 and "a recipe may have at most 1048576" in err
    assert len(err) < 1000  # not echoed back


def test_recipe_that_is_a_fifo_or_device(capsys, tmp_path):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    code, err = validate(capsys, fifo)
    assert code == 1 and "not a regular file" in err
    with pytest.raises(RecipeError, match="not a regular file"):
        load_recipe("/dev/zero")


def test_round_past_the_recipe(capsys):
    code, err = validate(capsys, "demo", "--round", "7")
    assert code == 1 and "round 7 is past the recipe's last round (rounds: 6)" in err


def test_every_round_is_validated_in_time_that_does_not_grow_with_rounds(capsys, tmp_path):
    """Rounds under the same overrides run with the same recipe, so one of each is checked
    (10,000 rounds once took 34 s): a bad override anywhere is still found, by its round."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodels: {base: world:base_model}\nrounds: 100\n"
                      'overrides: {"10-19": {sample: {k: 2}}, "50-": {sample: {k: 3}}, "60": {sample: {k: 4}}}\n')
    assert load_recipe(recipe).distinct_rounds() == [1, 10, 20, 50, 60, 61]
    assert main(["validate", str(recipe), "--skip-files", "--round", "100"]) == 0
    capsys.readouterr()
    recipe.write_text(recipe.read_text().replace('"60": {sample: {k: 4}}', '"60": {sample: {k: 0}}'))
    code, err = validate(capsys, recipe, "--skip-files")
    assert code == 1 and "round 60, with overrides.50-, overrides.60" in err and "sample.k" in err


def test_lengths_past_the_models_positions(capsys, tmp_path):
    """A length longer than the model's `max_position_embeddings` (its config.json, read
    without loading the model) is refused with the key, the length and the limit."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodels: {base: model}\nsft: {max_length: 4096}\n"
                      "sample: {max_prompt_length: 400, max_new_tokens: 200}\n")
    code, err = validate(capsys, recipe)
    assert code == 1, err
    assert f"sft.max_length: 4096 tokens, more than models.base's max_position_embeddings (512, from {model / 'config.json'})" in err
    assert "sample.max_prompt_length + sample.max_new_tokens: 600 tokens" in err
    assert "rm.max_length" in err and "dpo.max_length" in err  # their 2048 default
    recipe.write_text("name: r\nmodels: {base: model}\nrm: {max_length: 512}\nsft: {max_length: 512}\n"
                      "dpo: {max_length: 512}\nsample: {max_prompt_length: 256, max_new_tokens: 256}\n")
    assert main(["validate", str(recipe)]) == 0
    capsys.readouterr()


def test_a_model_folder_without_a_config(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodels: {base: model}\n")
    code, err = validate(capsys, recipe)
    assert code == 1 and f"models.base: 'model': {tmp_path / 'model'} has no config.json: not a model checkpoint" in err


def test_good_recipe_still_validates(capsys):
    assert main(["validate", "demo", "--round", "6"]) == 0
    assert main(["validate", "code", "--skip-files"]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------------------ data

DATA = {
    "pref_duplicate_ids.jsonl": ("preference", r"row 2: field 'id': duplicate id 'a' \(first used at .*:1\)"),
    "prompts_duplicate_ids.jsonl": ("prompts", r"row 2: field 'id': duplicate id 'a'"),
    "pref_chosen_is_rejected.jsonl": ("preference", r"row 1: field 'rejected': is identical to 'chosen'"),
    "pref_prompt_twice.jsonl": ("preference", r"row 1: field 'chosen': repeats the prompt"),
    # The U+2028/U+0085/U+2029 row is row 1, whole; the malformed line keeps its number, 2.
    "prompts_line_separators.jsonl": ("prompts", r"^[^\n]*row 2: malformed JSON"),
    "prompts_empty.jsonl": ("prompts", r"prompts_empty\.jsonl: empty: no rows"),
    "prompts_jsonl_named.parquet": ("prompts", r"not a readable Parquet file"),
}


def check_data(capsys, path, kind, expected, loader_fails=True):
    code = main(["validate-data", str(path), "--kind", kind])
    out = capsys.readouterr().out
    assert code == 1, out
    problems = "\n".join(line.strip() for line in out.splitlines())
    assert re.search(expected, problems, re.M), out
    assert "OK" not in out.splitlines()[0]
    if loader_fails:
        loader = {"preference": data.load_preferences, "prompts": data.load_prompts, "sft": data.load_sft}[kind]
        with pytest.raises(data.DataError) as info:
            loader(path)
        assert re.search(expected, str(info.value), re.M), str(info.value)


@pytest.mark.parametrize("name", sorted(DATA))
def test_bad_data(name, capsys):
    kind, expected = DATA[name]
    check_data(capsys, CORPUS / name, kind, expected, loader_fails=name != "prompts_empty.jsonl")


def test_line_separators_stay_inside_their_row():
    rows, errors = data.read_numbered_rows(CORPUS / "prompts_line_separators.jsonl")
    assert rows == [(1, {"prompt": "a\u2028b\u0085c\u2029d"})]
    assert [e.row for e in errors] == [2]


def test_deeply_nested_json(capsys, tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps({"prompt": "fine"}) + "\n" + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    check_data(capsys, deep, "prompts", r"row 2: malformed JSON: nested too deep")
    array = tmp_path / "deep.json"
    array.write_text("[" * 100_000 + "]" * 100_000)
    check_data(capsys, array, "prompts", r"deep\.json: malformed JSON: nested too deep")


def test_corrupt_parquet(capsys, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(256) + b"PAR1")
    check_data(capsys, bad, "preference", r"bad\.parquet: not a readable Parquet file")


def test_special_files_are_refused_without_reading(capsys, tmp_path):
    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    check_data(capsys, fifo, "prompts", r"not a regular file or folder")
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    check_data(capsys, zero, "prompts", r"not a regular file or folder")


def test_recipe_data_paths_to_special_files(capsys, tmp_path):
    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodels: {base: world:base_model}\n"
                      "data: {sft: [fifo.jsonl], prompts: [{path: zero.jsonl}]}\n")
    code, err = validate(capsys, recipe)
    assert code == 1
    assert "data.sft[0]: 'fifo.jsonl': not a regular file or folder" in err
    assert "data.prompts[0].path: 'zero.jsonl': not a regular file or folder" in err


def test_a_long_row_is_reported_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_ROW_BYTES", 100)
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"prompt": "x" * 500}) + "\n" + json.dumps({"prompt": "ok"}) + "\n")
    rows, errors = data.read_numbered_rows(f)
    assert rows == [(2, {"prompt": "ok"})]
    assert [str(e) for e in errors] == [f"{f}: row 1: longer than 100 bytes; not read"]


def test_corpus_line_separators_are_raw():
    """The corpus is data: a tool that 'fixes' line endings would hide the U+2028 case."""
    raw = (CORPUS / "prompts_line_separators.jsonl").read_bytes()
    assert "\u2028".encode() in raw and "\u0085".encode() in raw
