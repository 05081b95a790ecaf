"""JSONL loading: every malformed line is reported with its file, line and field, all at once."""

from __future__ import annotations

import json
import os

import pytest

from nemo_aligner.data.jsonl import MAX_LISTED_PROBLEMS, DataFormatError, FieldSpec, FieldType, load_jsonl_records

SCHEMA = {
    "prompt": FieldSpec(FieldType.TEXT_OR_MESSAGES),
    "response": FieldSpec(FieldType.TEXT),
    "note": FieldSpec(FieldType.TEXT, required=False, allow_empty=True),
    "reward": FieldSpec(FieldType.NUMBER, required=False),
}
GOOD = {"prompt": "p", "response": "r"}


def _write(tmp_path: os.PathLike[str], lines: list[str], name: str = "data.jsonl") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_valid_file_keeps_order_and_line_numbers_skipping_blank_lines(tmp_path):
    chat = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    lines = [json.dumps(GOOD), "", "   ", json.dumps({"prompt": chat, "response": "r", "reward": -1.5, "note": "",
                                                    "extra": [1]})]
    records = load_jsonl_records(_write(tmp_path, lines), SCHEMA)
    assert [r.line for r in records] == [1, 4]
    assert records[0].fields == GOOD
    assert records[1].fields["prompt"] == chat and records[1].fields["reward"] == -1.5


BAD_LINES = [
    ('{"prompt": "p", "response": ', None, "malformed JSON"),
    ('["prompt", "response"]', None, "expected a JSON object, got a list"),
    ('"just a string"', None, "expected a JSON object, got a string"),
    ('{"prompt": "p"}', "response", "missing"),
    ('{"prompt": "p", "response": 3}', "response", "expected a string, got a number"),
    ('{"prompt": "p", "response": null}', "response", "expected a string, got null"),
    ('{"prompt": "p", "response": ""}', "response", "empty string"),
    ('{"prompt": "", "response": "r"}', "prompt", "empty string"),
    ('{"prompt": {"role": "user"}, "response": "r"}', "prompt", "expected a string or a list of {role, content}"),
    ('{"prompt": [], "response": "r"}', "prompt", "empty message list"),
    ('{"prompt": ["hi"], "response": "r"}', "prompt", "message 0: expected an object"),
    ('{"prompt": [{"role": "user"}], "response": "r"}', "prompt", "message 0: missing 'content'"),
    ('{"prompt": [{"content": "x"}], "response": "r"}', "prompt", "message 0: missing 'role'"),
    ('{"prompt": [{"role": "user", "content": 5}], "response": "r"}', "prompt", "'content' must be a string"),
    ('{"prompt": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "response": "r"}', "prompt",
     "message 1: unknown role 'bot'"),
    ('{"prompt": "p", "response": "r", "reward": "1.0"}', "reward", "expected a number, got a string"),
    ('{"prompt": "p", "response": "r", "reward": true}', "reward", "expected a number, got a boolean"),
    ('{"prompt": "p", "response": "r", "reward": NaN}', "reward", "finite number"),
    ('{"prompt": "p", "response": "r", "note": 1}', "note", "expected a string"),
]


@pytest.mark.parametrize(("line", "field", "problem"), BAD_LINES, ids=[b[2] for b in BAD_LINES])
def test_each_bad_line_names_file_line_and_field(tmp_path, line, field, problem):
    path = _write(tmp_path, [json.dumps(GOOD), "", line])
    with pytest.raises(DataFormatError) as err:
        load_jsonl_records(path, SCHEMA)
    where = f"{path}:3: field '{field}': " if field else f"{path}:3: "
    assert where in str(err.value) and problem in str(err.value)
    assert f"{path}:1:" not in str(err.value)


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    path = os.path.join(tmp_path, "bad.jsonl")
    with open(path, "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_jsonl_records(path, SCHEMA)


def test_all_problems_are_reported_at_once(tmp_path):
    lines = [json.dumps(GOOD), "{oops", json.dumps({"prompt": 1}), json.dumps(GOOD), '{"prompt": "p", "response": ""}']
    path = _write(tmp_path, lines)
    with pytest.raises(DataFormatError) as err:
        load_jsonl_records(path, SCHEMA)
    message = str(err.value)
    assert message.startswith(f"{path}: 4 problem(s)")
    for expected in (f"{path}:2: malformed JSON", f"{path}:3: field 'prompt': expected a string or a list",
                     f"{path}:3: field 'response': missing", f"{path}:5: field 'response': empty string"):
        assert expected in message


def test_listing_is_capped(tmp_path):
    path = _write(tmp_path, ["{bad"] * (MAX_LISTED_PROBLEMS + 7))
    with pytest.raises(DataFormatError) as err:
        load_jsonl_records(path, SCHEMA)
    message = str(err.value)
    assert f"{path}:{MAX_LISTED_PROBLEMS}: malformed JSON" in message
    assert f"{path}:{MAX_LISTED_PROBLEMS + 1}:" not in message
    assert message.endswith("... and 7 more")


def test_missing_or_unreadable_file_names_the_path(tmp_path):
    missing = os.path.join(tmp_path, "nope.jsonl")
    with pytest.raises(DataFormatError, match=r"nope\.jsonl: cannot read the data file"):
        load_jsonl_records(missing, SCHEMA)
    with pytest.raises(DataFormatError, match="cannot read the data file"):
        load_jsonl_records(str(tmp_path), SCHEMA)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_file_without_records_is_an_error(tmp_path, content):
    path = os.path.join(tmp_path, "empty.jsonl")
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: the data file holds no records"):
        load_jsonl_records(path, SCHEMA)
