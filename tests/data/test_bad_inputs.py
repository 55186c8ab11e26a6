"""Bad data and bad paths fail at once, in one line that names the file and line (or the row), the column and
what was expected: malformed JSON lines, values of the wrong kind, empty files, missing splits, missing local
datasets and model folders, and the hub while offline."""

from __future__ import annotations

import json
import time

import datasets
import pytest

from fastalign.data import load_training_dataset, require_format, tokenize_sft

MESSAGES = [{"role": "user", "content": "hi"}]


def _lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and error.value.__cause__ is None  # one line, no chained tracebacks
    assert error.value.__context__ is None or error.value.__suppress_context__
    return message


def test_a_malformed_jsonl_line_is_named_file_colon_line(tmp_path):
    path = _lines(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}', "", '{"prompt": "c", completion: "d"}')
    with pytest.raises(ValueError) as error:
        load_training_dataset(path)
    assert _one_line(error).startswith(f"{path}:3: not valid JSON: Expecting property name")


@pytest.mark.parametrize(
    ("rows", "line", "problem"),
    [
        ([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 5}], 2, "column 'completion' holds int 5"),
        ([{"prompt": "a", "completion": 5}, {"prompt": "c", "completion": 6}], 1, "column 'completion' holds int 5"),
        ([{"prompt": [1, 2], "completion": "b"}], 1, "column 'prompt' holds list [1, 2]"),
        ([{"prompt": "p", "chosen": 1.5, "rejected": "r"}], 1, "column 'chosen' holds float 1.5"),
        (
            [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": None, "rejected": "r"}],
            2,
            "column 'chosen' is null",
        ),
        ([{"prompt": "p", "tests": ["assert f() == 1"]}, {"prompt": "p", "tests": 1}], 2, "column 'tests' holds int 1"),
        ([{"text": "a"}, [1, 2]], 2, "expected a JSON object"),
    ],
)
def test_values_of_the_wrong_kind_name_the_line_and_the_column(tmp_path, rows, line, problem):
    path = _lines(tmp_path / "d.jsonl", *(json.dumps(row) for row in rows))
    with pytest.raises(ValueError) as error:
        load_training_dataset(path)
    message = _one_line(error)
    assert message.startswith(f"{path}:{line}: {problem}")
    assert "expected" in message


def test_a_json_array_file_and_a_parquet_file_name_their_rows(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": 3}\n]\n')
    with pytest.raises(ValueError, match=rf"^{path}:3: column 'text' holds int 3; expected a string$"):
        load_training_dataset(path)
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "tests": "assert 1"}, {"prompt": "b", "tests": None}]).to_parquet(
        str(parquet)
    )
    assert load_training_dataset(parquet).num_rows == 2  # null tests: the code reward does not apply
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "b", "completion": None}]).to_parquet(
        str(parquet)
    )
    with pytest.raises(ValueError, match=rf"^{parquet}: row 2: column 'completion' is null"):
        load_training_dataset(parquet)


def test_datasets_built_in_python_name_the_row(tmp_path):
    for rows, message in [
        (
            [{"prompt": "a", "completion": 7}],
            r"^row 0 \(dataset\[0\]\): column 'completion' holds int 7; expected "
            r"a string or a non-empty list of \{'role', 'content'\} messages$",
        ),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}],
            r"^row 1 \(dataset\[1\]\): "
            r"column 'completion' is null",
        ),
        (
            [{"prompt": "p", "tests": 1}],
            r"^row 0 \(dataset\[0\]\): column 'tests' holds int 1; expected a string or a "
            r"list of strings",
        ),
        ([{"messages": MESSAGES}, {"messages": []}], r"^row 1 \(dataset\[1\]\): column 'messages' holds list \[\]"),
    ]:
        dataset = datasets.Dataset.from_list(rows)
        with pytest.raises(ValueError, match=message):
            require_format(dataset, "grpo" if "tests" in rows[0] else "sft")
    with pytest.raises(ValueError, match=r"^column 'completion' holds int 5; expected a string"):
        tokenize_sft({"prompt": "a", "completion": 5}, tokenizer=None)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_an_empty_file_has_no_rows(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"^no rows in {path}"):
        load_training_dataset(path)
    array = tmp_path / "d.json"
    array.write_text("[]")
    with pytest.raises(ValueError, match=rf"^no rows in {array}$"):
        load_training_dataset(array)


def test_a_single_file_has_only_a_train_split_and_a_folder_splits_by_file_name(tmp_path):
    path = _lines(tmp_path / "d.jsonl", *(json.dumps({"text": str(i)}) for i in range(10)))
    with pytest.raises(ValueError, match=r"has no 'test' split \(its splits: train\).*train\[90%:\]"):
        load_training_dataset(path, split="test")
    assert load_training_dataset(path, split="train[90%:]")["text"] == ["9"]
    folder = tmp_path / "folder"
    folder.mkdir()
    _lines(folder / "train.jsonl", json.dumps({"text": "train row"}))
    _lines(folder / "test.jsonl", json.dumps({"text": "held-out row"}))
    assert load_training_dataset(folder)["text"] == ["train row"]
    assert load_training_dataset(folder, split="test")["text"] == ["held-out row"]
    with pytest.raises(ValueError, match="has no 'validation' split"):
        load_training_dataset(folder, split="validation")


def test_a_missing_local_dataset_that_looks_like_a_hub_id_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _lines(tmp_path / "prompts.jsonl", json.dumps({"prompt": "p"}))

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    start = time.perf_counter()
    with pytest.raises(
        FileNotFoundError,
        match=r"'data/prompts' not found: no such local file or folder \(the local "
        r"folder 'data' exists",
    ):
        load_training_dataset("data/prompts")
    with pytest.raises(FileNotFoundError, match=r"did you mean 'prompts.jsonl'\?"):
        load_training_dataset("prompts")
    assert time.perf_counter() - start < 1


def test_a_hub_dataset_while_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prompts' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        FileNotFoundError,
        match=r"'someone/prompts' not found: no such local file or folder, and "
        r"HF_HUB_OFFLINE is set",
    ):
        load_training_dataset("someone/prompts")
