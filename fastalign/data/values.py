"""Checks that the columns fastalign reads hold values of the kind it expects, naming the row and the column.

=================================================  ==========================================================
column                                             expected
=================================================  ==========================================================
``prompt``, ``completion``, ``chosen``,            a string, or a non-empty list of ``{"role", "content"}``
``rejected``                                       messages (one kind per column); ``prompt`` may be null in
                                                   preference data (it is then taken from chosen/rejected)
``text``                                           a string
``messages``                                       a non-empty list of ``{"role", "content"}`` messages
``tests``                                          a string or a list of strings (Python statements), or null
=================================================  ==========================================================

Other columns are not checked: they go to the reward functions as they are.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Mapping
from typing import Any

import datasets
import pyarrow.compute as pc

TEXT, MESSAGES, TEXT_OR_MESSAGES, TESTS = "text", "messages", "text_or_messages", "tests"
EXPECTED = {
    TEXT: "a string",
    MESSAGES: "a non-empty list of {'role', 'content'} messages",
    TEXT_OR_MESSAGES: "a string or a non-empty list of {'role', 'content'} messages",
    TESTS: "a string or a list of strings (Python test statements), or null",
}
COLUMN_KINDS = {
    "prompt": TEXT_OR_MESSAGES,
    "completion": TEXT_OR_MESSAGES,
    "chosen": TEXT_OR_MESSAGES,
    "rejected": TEXT_OR_MESSAGES,
    "text": TEXT,
    "messages": MESSAGES,
    "tests": TESTS,
}

_short = reprlib.Repr()
_short.maxstring, _short.maxlist, _short.maxother = 40, 4, 40


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in value)
    )


def _nullable(column: str, columns: Any) -> bool:
    return column == "tests" or (column == "prompt" and "chosen" in columns and "rejected" in columns)


def value_problem(column: str, value: Any, columns: Any = ()) -> str | None:
    """Why ``value`` cannot be the ``column`` of a row with ``columns`` (``None`` when it can, or the column is
    not one fastalign reads)."""
    kind = COLUMN_KINDS.get(column)
    if kind is None:
        return None
    if value is None:
        return None if _nullable(column, columns) else f"column {column!r} is null; expected {EXPECTED[kind]}"
    if kind == TESTS:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            return None
    elif (kind in (TEXT, TEXT_OR_MESSAGES) and isinstance(value, str)) or (
        kind in (MESSAGES, TEXT_OR_MESSAGES) and _is_messages(value)
    ):
        return None
    return f"column {column!r} holds {type(value).__name__} {_short.repr(value)}; expected {EXPECTED[kind]}"


def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _feature_is_fine(kind: str, feature: Any, column: Any) -> bool:
    """Whether every non-null value of a column with this feature and Arrow data is of the expected kind."""
    inner = getattr(feature, "feature", None) if isinstance(feature, datasets.List | datasets.LargeList) else None
    if kind == TESTS:
        return _is_string(feature) or _is_string(inner)
    if kind in (TEXT, TEXT_OR_MESSAGES) and _is_string(feature):
        return True
    messages = isinstance(inner, dict) and "content" in inner and _is_string(inner.get("role"))
    if kind == TEXT or not messages:
        return False
    lengths = pc.list_value_length(column)
    return pc.min(lengths).as_py() != 0 and _roles_set(column)


def _roles_set(column: Any) -> bool:
    roles = pc.struct_field(pc.list_flatten(column), "role")
    return roles.null_count == 0


def check_values(dataset: Any, where: Callable[[int], str] | None = None) -> None:
    """Check every column of :data:`COLUMN_KINDS` that ``dataset`` has (a ``datasets.Dataset``; other kinds are
    not checked).

    String columns are checked from the Arrow schema and null counts; other columns value by value.

    Args:
        where: the row's place for the message (``"data.jsonl:3"``); default ``"row I (dataset[I])"``.

    Raises:
        ValueError: ``"<where>: column 'completion' holds int 5; expected a string or ..."`` for the first bad
            row of the first bad column.
    """
    if not isinstance(dataset, datasets.Dataset):
        return
    columns = dataset.column_names
    for column in columns:
        kind = COLUMN_KINDS.get(column)
        if kind is None:
            continue
        data = dataset.data.column(column)
        if _feature_is_fine(kind, dataset.features[column], data) and (
            _nullable(column, columns) or data.null_count == 0
        ):
            continue
        for index, value in enumerate(dataset[column]):
            problem = value_problem(column, value, columns)
            if problem is not None:
                raise ValueError(f"{where(index) if where else f'row {index} (dataset[{index}])'}: {problem}")
