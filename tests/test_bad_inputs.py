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
    # issue 24: kwargs are checked against each target's signature, built-ins included
    "recipe_reward_no_such_kwarg.yaml": r"reward\.kwargs\.no_such_kwarg: not an argument of "
                                        r"posttrain\.reward\.math:MathAnswerReward \(it takes: prompts_file, rel_tol, abs_tol\)",
    "recipe_nested_no_such_kwarg.yaml": r"reward\.kwargs\.components\[0\]\[0\]\.kwargs\.tolerance: not an argument of "
                                        r"posttrain\.reward\.math:MathAnswerReward",
    "recipe_checker_no_such_kwarg.yaml": r"eval\.checker\.kwargs\.no_such_kwarg: not an argument of "
                                         r"posttrain\.reward\.code:CodeTestReward \(it takes: prompts_file, ",
    "recipe_annotator_no_such_kwarg.yaml": r"annotate\.annotator\.kwargs\.no_such_kwarg: not an argument of "
                                           r"posttrain\.annotate\.world:WorldAnnotator \(it takes: thresholds, ",
    "recipe_reward_missing_kwarg.yaml": r"reward\.kwargs: posttrain\.reward:RMReward needs 'path', which the kwargs do not give",
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_bad_recipe(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
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


# ----------------------------------------------------------------------- run folders (issue 25)


def run_round_cli(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args)])
    return code, capsys.readouterr().err


def test_a_damaged_recorded_model_is_refused_by_the_next_round_and_named_by_verify(capsys, tmp_path,
                                                                                    tiny_model_dir):
    from run_folders import record_round, write_recipe

    recipe = write_recipe(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    record_round(run, 1, tiny_model_dir)
    weights = run / "round_01" / "average" / "model" / "model.safetensors"
    with open(weights, "r+b") as f:  # 100 kB of 0xFF over the model's weights, length unchanged
        f.write(b"\xff" * min(100_000, weights.stat().st_size))
    code, err = run_round_cli(capsys, "run-round", 2, "--recipe", recipe, "--run-dir", run)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"posttrain run-round: {weights}: differs from its record (its content changed); it "
                           f"was recorded by round 1 average, so nothing uses it. Make it again with `posttrain "
                           f"run-round 1 --recipe {recipe} --run-dir {run} --redo average` (later stages that "
                           f"used it then run again).")
    assert not (run / "round_02").exists()  # refused before any work
    code = main(["verify", str(run)])
    out = capsys.readouterr().out
    assert code == 1 and out.startswith(f"{weights}: differs from its record")


def test_a_second_writer_on_one_run_folder_is_refused(capsys, tmp_path, tiny_model_dir):
    from run_folders import write_recipe

    from posttrain.runlock import run_lock

    recipe = write_recipe(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    with run_lock(run):  # held by this process as another command would hold it (tests/test_runlock.py: two processes)
        import posttrain.runlock as runlock

        runlock._held.clear()  # forget it here, so this process's next take is a second writer's
        code, err = run_round_cli(capsys, "run", "--rounds", "1", "--recipe", recipe, "--run-dir", run)
    assert code == 1 and "Traceback" not in err
    assert re.match(rf"posttrain run: {re.escape(str(run))} is being written by another posttrain \(pid {os.getpid()} ",
                    err)
