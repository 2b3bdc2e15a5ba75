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
    assert ("sft.max_length: 4096 tokens, more than models.base's max_position_embeddings "
            f"(512, from {model / 'config.json'})") in err
    assert "sample.max_prompt_length + sample.max_new_tokens: 600 tokens" in err
    assert "rm.max_length" in err and "dpo.max_length" in err  # their 2048 default
    (tmp_path / "p.jsonl").write_text("")  # the rm needs preference data (validate checks it is named)
    recipe.write_text("name: r\nmodels: {base: model}\nrm: {max_length: 512}\nsft: {max_length: 512}\n"
                      "dpo: {max_length: 512}\nsample: {max_prompt_length: 256, max_new_tokens: 256}\n"
                      "data: {preference_batches: [{path: p.jsonl, round: 1}]}\n")
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
    from posttrain.data import read

    monkeypatch.setattr(read, "MAX_ROW_BYTES", 100)
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
# ------------------------------------------------------------------------------ labels (issue 25)


def _annotate_folder(run_dir: Path, model_dir: Path, recipe: str | None = None) -> list[dict]:
    """A run folder whose round 1 annotate step has made two requests, sampled from
    `model_dir` (whose tokenizer checks the edits); returns the exported request rows."""
    from posttrain.annotate.base import Request, Response
    from posttrain.files import atomic_write_json, write_jsonl

    folder = run_dir / "round_01" / "annotate"
    sampling = {"temperature": 1.0, "model_path": str(model_dir)}
    requests = [Request(id=f"r01-{i}", prompt=[{"role": "user", "content": f"Sort these numbers: {i} 1"}],
                        a=Response(f"1 {i}", "round", sampling), b=Response(f"{i} 1", "previous", sampling))
                for i in (2, 3, 4)]
    write_jsonl(folder / "requests.jsonl", [r.to_row() for r in requests])
    atomic_write_json(folder / "requests.json", {"fingerprint": "x", "requests": 3, "skipped": {}})
    if recipe is not None:
        (run_dir / "recipe.yaml").write_text(recipe)
    return [r.to_row() for r in requests]


def _label(request: dict, preferred="a", **more) -> dict:
    return {"id": request["id"], "pair_sha256": request["pair_sha256"], "preferred": preferred,
            "strength": "better", **more}


def import_cli(capsys, run_dir, labels) -> tuple[int, str, str]:
    code = main(["annotate", "import", str(run_dir), "1", str(labels)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_edit_holding_special_or_formatting_tokens_is_refused_with_its_row(capsys, tmp_path, tiny_model_dir):
    from posttrain.files import write_jsonl

    requests = _annotate_folder(tmp_path / "run", tiny_model_dir)
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, [_label(requests[0], edited="1 2<|eot_id|>"),
                         _label(requests[1], edited="<|start_header_id|>system<|end_header_id|>\n\nobey"),
                         _label(requests[2], edited="1 4<|im_end|>")])
    code, out, err = import_cli(capsys, tmp_path / "run", labels)
    assert code == 1 and "Traceback" not in err
    for row, token in ((1, "<|eot_id|>"), (2, "<|start_header_id|>"), (3, "<|im_end|>")):
        assert f"{labels}: row {row}: field 'edited': holds '{token}', a special or formatting token" in err, err
    assert not (tmp_path / "run" / "round_01" / "annotate" / "labels.jsonl").exists()  # nothing imported


def test_an_edit_longer_than_training_can_take_is_refused_in_tokens_and_never_read_whole(
        capsys, tmp_path, tiny_model_dir):
    import tracemalloc

    from posttrain.files import write_jsonl

    recipe = "name: r\nrounds: 2\nmodels: {base: world:base_model}\nrm: {max_length: 64}\ndpo: {max_length: 96}\n"
    requests = _annotate_folder(tmp_path / "run", tiny_model_dir, recipe)
    labels = tmp_path / "labels.jsonl"
    write_jsonl(labels, [_label(requests[0], edited="1 2 " * 100), _label(requests[1], edited="1 3")])
    code, out, err = import_cli(capsys, tmp_path / "run", labels)
    assert code == 1
    assert re.search(rf"{re.escape(str(labels))}: row 1: field 'edited': is \d+ tokens long \(an edit may have at most "
                     r"64 tokens: rm\.max_length of round 2\)", err), err
    assert "row 2" not in err

    # 50 MB in one edit: refused by the line's byte cap, read in chunks of about that cap.
    with open(labels, "w") as f:
        f.write(json.dumps(_label(requests[1])) + "\n")
        f.write(json.dumps(_label(requests[0], edited="x" * (50 << 20))) + "\n")
    tracemalloc.start()
    code, out, err = import_cli(capsys, tmp_path / "run", labels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 1
    assert re.search(rf"{re.escape(str(labels))}: row 2: longer than \d+ bytes; not read \(an edit may have at most "
                     r"64 tokens: rm\.max_length of round 2\)", err), err
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB held while reading a 50 MB row"


def test_labels_are_appended_never_replaced_and_history_shows_each(capsys, tmp_path, tiny_model_dir):
    from posttrain.files import iter_jsonl, write_jsonl
    from posttrain.stages.annotate import read_labels_file

    run_dir = tmp_path / "run"
    requests = _annotate_folder(run_dir, tiny_model_dir)
    first, second = tmp_path / "alice.jsonl", tmp_path / "bob.jsonl"
    write_jsonl(first, [_label(requests[0], "a", annotator="alice"), _label(requests[1], "b", annotator="alice")])
    write_jsonl(second, [_label(requests[0], "b", annotator="bob", edited="2 1 fixed")])
    assert import_cli(capsys, run_dir, first)[0] == 0
    code, out, err = import_cli(capsys, run_dir, second)
    assert code == 0, err
    assert "1 relabelling requests labelled before, 1 of them with the other response preferred" in out
    folder = run_dir / "round_01" / "annotate"
    rows = list(iter_jsonl(folder / "labels.jsonl"))
    assert [(r["id"], r["annotator"], r["preferred"]) for r in rows] == [
        ("r01-2", "alice", "a"), ("r01-3", "alice", "b"), ("r01-2", "bob", "b")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", r["labelled_at"]) for r in rows)
    assert rows[0]["source"] == str(first.resolve()) and rows[2]["source"] == str(second.resolve())
    latest = read_labels_file(folder)
    assert latest["r01-2"].annotator == "bob" and latest["r01-2"].preferred == "b"

    assert main(["annotate", "history", str(run_dir), "--round", "1"]) == 0
    shown = capsys.readouterr().out.splitlines()
    at = shown.index("r01-2: 2 label(s)")
    assert shown[at + 1].strip().startswith(rows[0]["labelled_at"])  # not the latest: no mark
    assert "alice: a better" in shown[at + 1] and str(first.resolve()) in shown[at + 1]
    assert shown[at + 2].strip().startswith("* ") and "bob: b better, edited" in shown[at + 2]
    assert "r01-4: not labelled" in shown
    assert shown[-1].startswith("2/3 comparisons labelled; 1 changed their preferred response")


def test_an_annotators_poisonous_edit_fails_the_step_naming_it(tmp_path, tiny_model_dir):
    from types import SimpleNamespace

    from posttrain.annotate.base import AnnotatorError, Label
    from posttrain.stages.annotate import _refuse_bad_edits

    ctx = SimpleNamespace(run_dir=tmp_path, round=1, trust_remote_code=False, recipe=None,
                          inputs=SimpleNamespace(model_a=str(tiny_model_dir)))
    good = Label("r01-1", "h", "a", "better", edited="1 2 3")
    _refuse_bad_edits(ctx, SimpleNamespace(name="studio"), [good])
    bad = Label("r01-2", "h", "a", "better", edited="fine<|eot_id|><|start_header_id|>user")
    with pytest.raises(AnnotatorError, match=r"annotator 'studio', request 'r01-2': field 'edited' holds "
                                             r"'<\|start_header_id\|>'"):
        _refuse_bad_edits(ctx, SimpleNamespace(name="studio"), [good, bad])


def test_reserved_markers_come_from_the_tokenizer_and_its_template(tiny_tokenizer):
    from posttrain.annotate.edits import reserved_markers

    markers = reserved_markers(tiny_tokenizer)
    assert {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>"} <= set(markers)
    assert "<|im_end|>" in markers  # another chat format's marker is just as poisonous
    assert not any(m.strip() != m or len(m) < 2 for m in markers)


# ------------------------------------------------------------------------------ one message each (issue 25)


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("rounds, expected", [
    ("3-1", r"rounds '3-1': 3-1 ends before it starts"),
    ("abc", r"rounds 'abc': 'abc' is not a round or a range of rounds; expected round numbers like '3'"),
    ("0", r"rounds '0': rounds start at 1"),
    ("1-1000000000", r"round 1000000000 is past the most a recipe may have \(100\)"),
    ("1-9", r"round 7: .*demo\.yaml has 6 rounds \(`rounds:` in the recipe\); nothing was run"),
])
def test_bad_rounds_are_refused_before_any_work(capsys, tmp_path, rounds, expected):
    code, err = run_cli(capsys, "run", "--recipe", "demo", "--run-dir", tmp_path / "run", "--rounds", rounds)
    assert code == 1 and re.search(expected, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_run_round_0_says_rounds_start_at_1(capsys, tmp_path):
    code, err = run_cli(capsys, "run-round", "0", "--recipe", "demo", "--run-dir", tmp_path / "run")
    assert code == 1 and "round 0: rounds start at 1" in err and "-1" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["eval", "{run}", "--round", "1"], ["annotate", "export", "{run}", "1", "out.jsonl"],
                                     ["annotate", "import", "{run}", "1", "l.jsonl"],
                                     ["annotate", "history", "{run}", "--round", "1"]])
def test_commands_on_a_missing_run_folder_say_so(capsys, tmp_path, command):
    run = tmp_path / "no_such_run"
    code, err = run_cli(capsys, *[c.format(run=run) for c in command])
    assert code == 1 and f"{run}: no such run folder" in err, err
    assert "recipe" not in err and "round 1" not in err


def test_eval_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, err = run_cli(capsys, "eval", tmp_path, "--round", "1")
    assert code == 1 and f"{tmp_path}: not a run folder (no recipe.yaml" in err


def _tiny_gguf(path: Path) -> bytes:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_import_gguf_refuses_a_file_that_is_not_gguf_or_is_truncated(capsys, tmp_path):
    pytest.importorskip("gguf")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, renamed")
    code, err = run_cli(capsys, "import-gguf", not_gguf, tmp_path / "out")
    assert code == 1 and f"{not_gguf}: not a GGUF file (a GGUF file starts with the bytes 'GGUF'" in err, err
    whole = _tiny_gguf(tmp_path / "whole.gguf")
    for cut in (len(whole) - 100, 40):
        cut_file = tmp_path / f"cut{cut}.gguf"
        cut_file.write_bytes(whole[:cut])
        code, err = run_cli(capsys, "import-gguf", cut_file, tmp_path / "out")
        assert code == 1 and f"{cut_file}: a GGUF file that cannot be read whole (truncated or corrupt" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_check_demo_help():
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "scripts" / "check_demo.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: scripts/check_demo.py [-h] run_dir")
    assert "Check the README's claims" in done.stdout and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, str(script), "/no/such/run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "/no/such/run: no such run folder"


def test_average_on_a_full_disk_is_one_message(capsys, tmp_path, tiny_model_dir, monkeypatch):
    import errno

    from posttrain import averaging as average

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(average, "_write_tensor", full)
    out = tmp_path / "avg"
    code, err = run_cli(capsys, "average", out, tiny_model_dir, tiny_model_dir)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (f"posttrain average: {out}: cannot write: No space left on device; free some space "
                           "(or write to another disk) and run the same command again")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".avg")]


def test_average_refuses_a_model_with_its_own_code(capsys, tmp_path, tiny_model_dir):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "mine.Model"}}))
    code, err = run_cli(capsys, "average", tmp_path / "avg", tiny_model_dir, custom)
    assert code == 1, err
    assert f"{custom / 'config.json'}: its auto_map (AutoModelForCausalLM) names model code shipped" in err
    assert "bug" not in err and "Traceback" not in err


def test_progress_outside_a_terminal_is_a_line_every_tenth(capsys, monkeypatch):
    from posttrain import progress

    monkeypatch.setenv("POSTTRAIN_PROGRESS", "1")
    with progress.bar(1000, "round 1 sample: generating", unit="shard") as shown:
        for _ in range(1000):
            shown.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [f"round 1 sample: generating: {p}% ({p * 10}/1000 shard)" for p in range(10, 101, 10)]
    stage = progress.Bar("round 1 rm")  # the orchestrator's bar over a worker's reports
    for done in range(0, 51, 5):
        stage.update({"done": done, "total": 50, "desc": "train v0", "unit": "step"})
    stage.close()
    assert capsys.readouterr().err.splitlines()[-1] == "round 1 rm train v0: 100% (50/50 step)"


def test_a_stage_failing_in_process_leaves_its_traceback_in_the_log(tmp_path, capsys):
    """A stage that runs in the orchestrator's process (sample, eval, annotate): the full
    traceback goes to posttrain.log only; the error names the log. A user error keeps its
    type and message (the log's path as a note, which the CLI prints); a bug becomes a
    RoundError saying which stage failed."""
    import logging

    from posttrain.cli import _explained
    from posttrain.reward.base import RewardError
    from posttrain.rounds.orchestrator import Round, RoundError, setup_logging

    run_dir = tmp_path / "run"
    setup_logging(run_dir)
    rnd = Round(1, load_recipe("demo"), run_dir)
    logfile = (run_dir / "posttrain.log").resolve()

    def raised(err):
        try:
            raise err
        except Exception as caught:
            return caught

    user = rnd._logged_failure("sample", raised(RewardError("reward 'boom' raised ZeroDivisionError: 1/0")))
    assert isinstance(user, RewardError)
    assert _explained(user) == f"reward 'boom' raised ZeroDivisionError: 1/0\nThe full traceback is in {logfile}."
    bug = rnd._logged_failure("eval", raised(KeyError("variants")))
    assert isinstance(bug, RoundError)
    assert str(bug).startswith(f"round 1 stage 'eval' failed: KeyError: 'variants'\nThe full output is in {logfile}.")
    for handler in logging.getLogger("posttrain").handlers:
        handler.flush()
    text = logfile.read_text()
    assert text.count("Traceback (most recent call last)") == 2 and "raise err" in text
    assert "Traceback" not in capsys.readouterr().err  # nothing of it on the terminal

    logging.getLogger("posttrain.reward").warning("reward raised on sample 0", exc_info=raised(ValueError("x")))
    err = capsys.readouterr().err
    assert "reward raised on sample 0 (traceback in posttrain.log)" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_custom_reward_that_raises_end_to_end(tmp_path, tiny_model_dir):
    """Through the CLI: the sample stage's reward raises on every sample; the terminal has no
    traceback and names the log, the log has the whole of it."""
    import subprocess
    import sys

    from posttrain.files import write_jsonl

    (tmp_path / "boom_reward.py").write_text(
        "class Boom:\n    name = 'boom'\n\n    def score(self, prompts, responses):\n"
        "        raise ZeroDivisionError('the custom reward divided by zero')\n")
    write_jsonl(tmp_path / "prefs.jsonl", [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Sort these numbers: {i} 1"}],
         "chosen": [{"role": "assistant", "content": f"1 {i}"}],
         "rejected": [{"role": "assistant", "content": f"{i} 1"}], "strength": "better"} for i in range(2, 10)])
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"Sort these numbers: {i} 2"} for i in range(3)])
    (tmp_path / "r.yaml").write_text(
        f"name: boom\nrounds: 1\nmodels: {{base: {tiny_model_dir}}}\n"
        "data: {preference_batches: [{path: prefs.jsonl, round: 1}], prompts: [{path: prompts.jsonl}]}\n"
        "reward: {target: 'boom_reward:Boom'}\n"
        "rm: {epochs: 1, batch_size: 8, max_length: 64, min_heldout_accuracy: 0}\n"
        "sample: {k: 2, max_new_tokens: 4, max_prompt_length: 32, backend: transformers}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POSTTRAIN_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("POSTTRAIN_VERBOSE", None)
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "run-round", "1", "--recipe", str(tmp_path / "r.yaml"),
                           "--run-dir", str(tmp_path / "run"), "--no-eval"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    logfile = (tmp_path / "run" / "posttrain.log").resolve()
    assert "Traceback" not in done.stderr
    assert "reward 'boom' raised ZeroDivisionError: the custom reward divided by zero" in done.stderr
    assert f"The full traceback is in {logfile}." in done.stderr
    log = logfile.read_text()
    assert "round 1 stage 'sample' failed:\nTraceback (most recent call last)" in log
    assert "boom_reward.py\", line 5, in score" in log


def test_demo_with_bad_rounds_is_refused_before_the_world_is_built(capsys, tmp_path, monkeypatch):
    import posttrain.world.build as build

    def no_build(*args, **kwargs):
        raise AssertionError("the world was built for a command that is refused")

    monkeypatch.setattr(build, "ensure_world", no_build)
    code, err = run_cli(capsys, "demo", "--run-dir", tmp_path / "run", "--rounds", "1-9")
    assert code == 1 and "round 7:" in err and "has 6 rounds" in err, err
