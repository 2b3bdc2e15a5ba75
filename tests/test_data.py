"""Data readers and validators: every bad input with its exact error text, every file
format, and TRL's standard / conversational / implicit-prompt forms normalised alike."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from posttrain import data
from posttrain.data import DataError, DataErrors, FilterCounts, Preference, Prompt, SFTExample

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731


def write_jsonl(path, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problems(path, kind) -> list[str]:
    """Every problem of a file as text, relative to its folder."""
    report = data.validate_file(path, kind)
    return [str(p).replace(str(path.parent) + "/", "") for p in report.problems]


# ------------------------------------------------------------------ error text contract


def test_error_text():
    err = DataError("prefs.jsonl", 12, "chosen", "must be a non-empty string or a list of messages")
    assert str(err) == "prefs.jsonl: row 12: field 'chosen': must be a non-empty string or a list of messages"
    assert str(DataError("prefs.jsonl", 3, None, "malformed JSON: x")) == "prefs.jsonl: row 3: malformed JSON: x"
    assert str(DataError("d", None, None, "no such file or folder")) == "d: no such file or folder"
    one = DataErrors([err])
    assert str(one) == str(err) and one.errors == [err]
    two = DataErrors([err, DataError("p.jsonl", 1, "id", "x")])
    assert str(two).splitlines() == ["2 problems in the data:", str(err), "p.jsonl: row 1: field 'id': x"]
    assert isinstance(two, DataError)  # `except DataError` catches both
    import pickle

    back = pickle.loads(pickle.dumps(two))
    assert str(back) == str(two) and [str(e) for e in back.errors] == [str(e) for e in two.errors]
    assert (back.errors[0].file, back.errors[0].row, back.errors[0].field) == ("prefs.jsonl", 12, "chosen")


# ------------------------------------------------------------------------ preferences


BAD_PREFERENCES = [
    # (row, expected problem text without the file name)
    ('{"prompt": "q", "chosen": "a", "rejected": "b",}',
     ["row 1: malformed JSON: Expecting property name enclosed in double quotes (column 48)"]),
    ('["not", "an", "object"]', ["row 2: must be a JSON object, got list"]),
    ({"prompt": "q", "rejected": "b"}, ["row 3: field 'chosen': missing"]),
    ({"prompt": "q", "chosen": 5, "rejected": "b"},
     ["row 4: field 'chosen': must be a non-empty string or a list of messages, got int"]),
    ({"prompt": "q", "chosen": "a", "rejected": "  "},
     ["row 5: field 'rejected': must be a non-empty string or a list of messages"]),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "edited": "a"},
     ["row 6: field 'edited': is identical to 'chosen' (an edit must change the response)"]),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "strength": "much_better"},
     ["row 7: field 'strength': unknown label 'much_better' (expected one of significantly_better, "
      "better, slightly_better, marginally_better)"]),
    ({"chosen": [U("q"), A("a"), U("more?")], "rejected": [U("q"), A("b")]},
     ["row 8: field 'chosen': the conversation must end with the assistant turn being ranked, "
      "but it ends with a 'user' turn"]),
    ({"prompt": [{"role": "bot", "content": "q"}], "chosen": [A("a")], "rejected": [A("b")]},
     ["row 9: field 'prompt': message 1: unknown role 'bot' (expected one of system, user, "
      "assistant, ipython, tool)"]),
    ({"chosen": [U("q"), A("a")], "rejected": [U("other q"), A("b")]},
     ["row 10: field 'rejected': the conversation before the ranked turn differs from the one in 'chosen'"]),
    ({"chosen": "a", "rejected": "b"},
     ["row 11: field 'prompt': missing: plain-text chosen/rejected need a 'prompt' field"]),
    ({"prompt": [U("q"), A("earlier")], "chosen": "a", "rejected": "b"},
     ["row 12: field 'prompt': must not end with an assistant turn (the assistant turn to rank "
      "or generate comes after it)"]),
    ({"prompt": [S("sys"), U("q")], "chosen": "a", "rejected": "b", "system": "other"},
     ["row 13: field 'system': given, but the conversation already starts with a system message"]),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b", "capability": 3},
     ["row 14: field 'chosen': message 1: 'content' must be a string",
      "row 14: field 'capability': must be a string, got int"]),
    ({"prompt": "q", "chosen": [A("")], "rejected": "b"},
     ["row 15: field 'chosen': the ranked assistant turn is empty"]),
    ({"chosen": [A("a")], "rejected": [A("b")]},
     ["row 16: field 'chosen': there is no prompt before the ranked assistant turn"]),
    ({"chosen": [U("q"), A("x"), A("a")], "rejected": [U("q"), A("x"), A("b")]},
     ["row 17: field 'chosen': the turn before the ranked assistant turn is also an assistant turn"]),
    ({"prompt": 7, "chosen": "a", "rejected": [U("q")], "strength": "best"},
     ["row 18: field 'prompt': must be a non-empty string or a list of messages, got int",
      "row 18: field 'rejected': the conversation must end with the assistant turn being ranked, "
      "but it ends with a 'user' turn",
      "row 18: field 'strength': unknown label 'best' (expected one of significantly_better, better, "
      "slightly_better, marginally_better)"]),
]


def test_every_bad_preference_is_reported_with_file_row_field(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [row for row, _ in BAD_PREFERENCES] +
                       [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    expected = [f"prefs.jsonl: {text}" for _, texts in BAD_PREFERENCES for text in texts]
    assert problems(path, "preference") == expected
    with pytest.raises(DataErrors) as info:
        data.load_preferences(path)
    assert [str(e).replace(str(tmp_path) + "/", "") for e in info.value.errors] == expected
    assert str(info.value).startswith(f"{len(expected)} problems in the data:\n")


def test_good_preference_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b", "edited": "a, fixed", "strength": "better",
         "capability": "math", "system": "be brief", "id": 42, "score_chosen": 9.0},
        "",  # blank lines keep numbering
        {"prompt": "q2", "chosen": "c", "rejected": "d"},
    ])
    first, second = data.load_preferences(path)
    assert first == Preference(id="42", prompt=[S("be brief"), U("q")], chosen="a", rejected="b",
                               edited="a, fixed", strength="better", capability="math",
                               source=f"{path}:1")
    assert second.id == f"{path}:3" and second.source == f"{path}:3"
    assert second.edited is second.strength is second.capability is None


def test_trl_formats_normalise_identically(tmp_path):
    rows = [
        # standard
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "edited": "It is 4."},
        # conversational, explicit prompt
        {"prompt": [U("What is 2+2?")], "chosen": [A("4")], "rejected": [A("5")], "edited": [A("It is 4.")]},
        # conversational, implicit prompt (TRL: whole conversations sharing a prefix)
        {"chosen": [U("What is 2+2?"), A("4")], "rejected": [U("What is 2+2?"), A("5")],
         "edited": [U("What is 2+2?"), A("It is 4.")]},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prefs = data.load_preferences(path)
    assert len(prefs) == 3
    normal = [replace(p, id="", source="") for p in prefs]
    assert normal[0] == normal[1] == normal[2] == Preference(
        id="", prompt=[U("What is 2+2?")], chosen="4", rejected="5", edited="It is 4.")
    # multi-turn implicit: the shared prefix (with its assistant turn) is the prompt
    path2 = write_jsonl(tmp_path / "m.jsonl", [
        {"chosen": [U("a"), A("b"), U("c"), A("good")], "rejected": [U("a"), A("b"), U("c"), A("bad")]}])
    (p,) = data.load_preferences(path2)
    assert p.prompt == [U("a"), A("b"), U("c")] and (p.chosen, p.rejected) == ("good", "bad")


def test_duplicate_ids_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "id": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "id": "x"}])
    with pytest.raises(DataErrors) as info:
        data.load_preferences([a, b])
    assert str(info.value) == f"{b}: row 1: field 'id': duplicate id 'x' (first used at {a}:1)"


# -------------------------------------------------------------------------------- SFT


def test_sft_formats_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [U("q"), A("a")], "capability": "code"},
        {"prompt": "q", "completion": "a"},
        {"prompt": [U("q")], "completion": [A("a")], "system": "s"},
        {"messages": [U("q"), A("a"), U("more")]},
        {"text": "raw pretraining text"},
        {"prompt": "q"},
        {"messages": [A("a")]},
        {"messages": [U("q"), {"role": "robot", "content": "a"}]},
        {"prompt": "q", "completion": ""},
    ])
    assert problems(path, "sft") == [
        "sft.jsonl: row 4: field 'messages': the conversation must end with an assistant turn, "
        "but it ends with a 'user' turn",
        "sft.jsonl: row 5: field 'messages': missing: expected 'messages', or 'prompt' and 'completion'",
        "sft.jsonl: row 6: field 'completion': missing",
        "sft.jsonl: row 7: field 'messages': has no user turn before the assistant turn",
        "sft.jsonl: row 8: field 'messages': message 2: unknown role 'robot' (expected one of "
        "system, user, assistant, ipython, tool)",
        "sft.jsonl: row 9: field 'completion': must be a non-empty string or a list of messages",
    ]
    good = write_jsonl(tmp_path / "good.jsonl", [
        {"messages": [U("q"), A("a")], "capability": "code"},
        {"prompt": "q", "completion": "a"},
        {"prompt": [U("q")], "completion": [A("a")], "system": "s"},
    ])
    ex = data.load_sft(good)
    assert ex[0] == SFTExample(id=f"{good}:1", messages=[U("q"), A("a")], capability="code", source=f"{good}:1")
    assert ex[1].messages == [U("q"), A("a")]
    assert ex[2].messages == [S("s"), U("q"), A("a")]


# ---------------------------------------------------------------------------- prompts


def test_prompts_meta_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "sort 3 1 2", "capability": "code", "answer": "1 2 3", "tests": ["t1"], "id": "p1"},
        {"prompt": [S("be terse"), U("hi")]},
        {"prompt": [U("hi")], "system": "steer"},
        {"capability": "code"},
        {"prompt": [U("hi"), A("hello")]},
        {"prompt": [S("be terse"), U("hi")], "system": "steer"},
    ])
    assert problems(path, "prompts") == [
        "prompts.jsonl: row 4: field 'prompt': missing",
        "prompts.jsonl: row 5: field 'prompt': must not end with an assistant turn (the assistant "
        "turn to rank or generate comes after it)",
        "prompts.jsonl: row 6: field 'system': given, but the prompt already starts with a system message",
    ]
    ok = write_jsonl(tmp_path / "ok.jsonl", [
        {"prompt": "sort 3 1 2", "capability": "code", "answer": "1 2 3", "tests": ["t1"], "id": "p1"},
        {"prompt": [U("hi")], "system": "steer"},
    ])
    a, b = data.load_prompts(ok)
    assert a == Prompt(id="p1", messages=[U("sort 3 1 2")], capability="code", system=None,
                       meta={"answer": "1 2 3", "tests": ["t1"]}, source=f"{ok}:1")
    assert b.system == "steer" and b.messages == [U("hi")] and b.meta == {}


# ------------------------------------------------------------------------ file formats


ROWS = [
    {"prompt": [U("q1")], "chosen": [A("a1")], "rejected": [A("b1")], "strength": "better"},
    {"prompt": [U("q2")], "chosen": [A("a2")], "rejected": [A("b2")], "strength": None},
]


def _normal(prefs):
    return [replace(p, source=p.source.rpartition(":")[2], id=p.id.rpartition(":")[2]) for p in prefs]


def test_file_formats_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    jsonl = write_jsonl(tmp_path / "p.jsonl", ROWS)
    arr = tmp_path / "p.json"
    arr.write_text(json.dumps(ROWS))
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    folder = tmp_path / "ds"
    Dataset.from_list(ROWS).save_to_disk(str(folder))
    one_split = tmp_path / "dd1"
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(one_split))

    expected = _normal(data.load_preferences(jsonl))
    assert [p.chosen for p in expected] == ["a1", "a2"] and expected[1].strength is None
    for path in (arr, parquet, folder, one_split):
        assert _normal(data.load_preferences(path)) == expected, path
    assert data.read_rows(parquet)[0]["chosen"] == [A("a1")]

    two = tmp_path / "dd2"
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(str(two))
    with pytest.raises(DataError, match=r"a DatasetDict with splits \['test', 'train'\]: point at one split"):
        data.read_rows(two)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="a folder, but not one written by datasets' save_to_disk"):
        data.read_rows(tmp_path / "plain")
    (tmp_path / "p.csv").write_text("prompt\n")
    with pytest.raises(DataError, match=r"unknown file type '.csv'"):
        data.load_preferences(tmp_path / "p.csv")
    with pytest.raises(DataError, match="no such file or folder"):
        data.read_rows(tmp_path / "missing.jsonl")


def test_read_rows_raises_on_malformed_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ['{"a": 1}', "{oops", '{"b": 2}'])
    with pytest.raises(DataErrors, match=r"x.jsonl: row 2: malformed JSON"):
        data.read_rows(path)


# ---------------------------------------------------------------------- validate_file


def test_validate_file_counts_and_token_limit(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi", "chosen": "a", "rejected": "b", "strength": "better", "capability": "math"},
        {"prompt": "hi " * 40, "chosen": "a", "rejected": "b", "edited": "c"},
        {"prompt": "hi", "chosen": "a"},
    ])
    report = data.validate_file(path, "preference", tokenizer=tiny_tokenizer, max_prompt_tokens=30)
    # "hi" renders to 16 prompt tokens with this template (see test_chat); "hi " * 40 to far more
    n = len(tiny_tokenizer(data_prompt_text(tiny_tokenizer, "hi " * 40), add_special_tokens=False)["input_ids"])
    assert n > 30
    assert [str(p).replace(str(tmp_path) + "/", "") for p in report.problems] == [
        f"p.jsonl: row 2: field 'prompt': {n} tokens, over the limit of 30",
        "p.jsonl: row 3: field 'rejected': missing",
    ]
    assert report.rows == 3 and not report.ok
    assert report.counts == {"capability=math": 1, "invalid": 2, "strength=None": 1,
                             "strength=better": 1, "valid": 1, "with_edit": 1}
    text = data.format_report(report)
    assert text.splitlines()[0] == f"{path} (preference): 3 rows, 2 problem(s)"
    assert f"  {report.problems[1]}" in text.splitlines()
    # without a tokenizer the long prompt is fine
    assert len(data.validate_file(path, "preference").problems) == 1
    # an unreadable file is a report with one problem, not an exception
    bad = data.validate_file(tmp_path / "nope.jsonl", "sft")
    assert [str(p) for p in bad.problems] == [f"{tmp_path}/nope.jsonl: no such file or folder"]
    with pytest.raises(ValueError, match="unknown data kind 'prefs'"):
        data.validate_file(path, "prefs")


def data_prompt_text(tok, text):
    from posttrain.chat import render_prompt

    return render_prompt(tok, [U(text)])


# ------------------------------------------------------------------------ FilterCounts


def test_filter_counts():
    fc = FilterCounts("rm pairs")
    for label in ["better", "slightly_better", "significantly_better", "marginally_better", "slightly_better"]:
        if label in ("better", "significantly_better"):
            fc.keep()
        else:
            fc.drop(label)
    assert fc.summary() == {"name": "rm pairs", "total": 5, "kept": 2, "dropped": 3,
                            "dropped_by_reason": {"marginally_better": 1, "slightly_better": 2}}
    assert str(fc) == "rm pairs: kept 2 of 5 (dropped marginally_better: 1, slightly_better: 2)"


def test_encoding_problems(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "q"}).encode() + b"\n")
    assert data.read_rows(bom) == [{"prompt": "q"}]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        data.load_prompts(latin)
    assert str(info.value) == f"{latin}: row 1: not UTF-8 text (byte 15)"  # the row is named now
