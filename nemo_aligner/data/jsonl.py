"""Read a JSONL data file and validate every record against a field schema before any use.

The whole file is checked up front and every problem is reported at once, one line each, as
``path:LINE: field 'name': problem``, so a bad data set fails in seconds with a list to fix
instead of at step 1000 with a KeyError.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

logger = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant"})
"""Roles a chat message may have."""

MAX_LISTED_PROBLEMS = 20
"""How many problems a DataFormatError lists before it summarises the rest as '... and N more'."""


class DataFormatError(ValueError):
    """A data file is missing, unreadable, or holds records that do not match its schema."""


class FieldType(enum.Enum):
    """The JSON values a field accepts."""

    TEXT = "a string"
    TEXT_OR_MESSAGES = "a string or a list of {role, content} messages"
    MESSAGES = "a list of {role, content} messages"
    NUMBER = "a number"


@dataclass(frozen=True)
class FieldSpec:
    """How one field of a record is checked.

    Attributes:
        type: the JSON values the field accepts.
        required: whether a record must have the field (an optional field may be absent, not null).
        allow_empty: whether an empty string is accepted (for TEXT and TEXT_OR_MESSAGES).
    """

    type: FieldType
    required: bool = True
    allow_empty: bool = False


Schema = Mapping[str, FieldSpec]
"""Field name -> its spec. Fields a record has beyond the schema are ignored."""

RecordCheck = Callable[[Mapping[str, Any]], list[str]]
"""Checks that span fields: takes a record whose fields all match the schema, returns its problems,
each as ``"field 'name': problem"`` (empty if none)."""


@dataclass(frozen=True)
class JsonlRecord:
    """One validated record and the 1-based line it came from (for later error messages)."""

    line: int
    fields: dict[str, Any]


def load_jsonl_records(path: str | os.PathLike[str], schema: Schema, *,
                       record_check: RecordCheck | None = None) -> list[JsonlRecord]:
    """Reads a whole JSONL file and returns its records, or raises listing every problem in it.

    Blank lines are skipped. Checked per line: valid UTF-8, valid JSON, a JSON object, and per
    schema field: present if required, the right type, not an empty string unless allowed, and
    for chat messages a non-empty list of ``{"role": str, "content": str}`` objects whose roles
    are in CHAT_ROLES. Booleans are not numbers; NaN and infinities are rejected. A record that
    passes all of that then goes through record_check, if given.

    Args:
        path: the JSONL file.
        schema: what each record must hold.
        record_check: checks that span fields (e.g. "either these fields or that one"); its
            problems are reported like the schema's, with the path and line.

    Returns:
        The records in file order, each with its line number.

    Raises:
        DataFormatError: the file is missing or unreadable, holds no records, or any record is
            invalid; the message names the path, and for each problem its line and field.
    """
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read the data file ({err.strerror or err})") from err
    records: list[JsonlRecord] = []
    problems: list[str] = []
    for line_no, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        value, line_problems = _parse_line(raw, schema)
        if not line_problems and record_check is not None:
            line_problems = record_check(value)
        problems.extend(f"{path}:{line_no}: {problem}" for problem in line_problems)
        if not line_problems:
            records.append(JsonlRecord(line=line_no, fields=value))
    if problems:
        raise DataFormatError(_problem_report(path, problems))
    if not records:
        raise DataFormatError(f"{path}: the data file holds no records (it is empty or has only blank lines)")
    logger.debug("%s: %d records", path, len(records))
    return records


def _parse_line(raw: bytes, schema: Schema) -> tuple[dict[str, Any], list[str]]:
    """Decodes one non-blank line and checks it; returns the object and its problems."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return {}, [f"not valid UTF-8 ({err.reason} at byte {err.start})"]
    except json.JSONDecodeError as err:
        return {}, [f"malformed JSON ({err.msg} at column {err.colno})"]
    if not isinstance(value, dict):
        return {}, [f"expected a JSON object, got {_json_type(value)}"]
    problems = []
    for name, spec in schema.items():
        if name not in value:
            if spec.required:
                problems.append(f"field '{name}': missing (required: {spec.type.value})")
            continue
        problem = _field_problem(value[name], spec)
        if problem is not None:
            problems.append(f"field '{name}': {problem}")
    return value, problems


def _field_problem(value: Any, spec: FieldSpec) -> str | None:
    """What is wrong with one field's value, or None if it matches its spec."""
    if spec.type is FieldType.NUMBER:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {spec.type.value}, got {_json_type(value)}"
        return None if math.isfinite(value) else f"expected a finite number, got {value}"
    if isinstance(value, str) and spec.type is not FieldType.MESSAGES:
        return "empty string" if not value and not spec.allow_empty else None
    if spec.type is not FieldType.TEXT and isinstance(value, list):
        return _messages_problem(value)
    return f"expected {spec.type.value}, got {_json_type(value)}"


def _messages_problem(messages: list[Any]) -> str | None:
    """What is wrong with a chat message list (the first problem found), or None."""
    if not messages:
        return "empty message list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i}: expected an object with 'role' and 'content', got {_json_type(message)}"
        for key in ("role", "content"):
            if key not in message:
                return f"message {i}: missing '{key}'"
            if not isinstance(message[key], str):
                return f"message {i}: '{key}' must be a string, got {_json_type(message[key])}"
        if message["role"] not in CHAT_ROLES:
            return f"message {i}: unknown role {message['role']!r} (allowed: {', '.join(sorted(CHAT_ROLES))})"
    return None


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _problem_report(path: str | os.PathLike[str], problems: list[str]) -> str:
    """One message listing the first MAX_LISTED_PROBLEMS problems and counting the rest."""
    listed = problems[:MAX_LISTED_PROBLEMS]
    if len(problems) > len(listed):
        listed.append(f"... and {len(problems) - len(listed)} more")
    return f"{path}: {len(problems)} problem(s) in the data file:\n" + "\n".join(f"  {p}" for p in listed)
