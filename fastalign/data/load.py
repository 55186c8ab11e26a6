"""Loading a training dataset from a local file, a folder of files, or the Hugging Face hub.

Local JSON / JSONL data that cannot be read is reported as ``FILE:LINE: reason`` (1-based, as editors number
lines), and values of the wrong kind as ``FILE:LINE: column 'completion' holds int 5; expected ...``
(:mod:`fastalign.data.values`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from fastalign.data.values import check_values, value_problem

# Local file suffixes and the `datasets` builder that reads them.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A hub dataset id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_SLICES = (
    "--dataset_train_split 'train[:90%]' --dataset_test_split 'train[90%:]' (datasets' slice syntax), or a "
    "folder holding train.jsonl and test.jsonl (files are assigned to splits by name, as on the hub)"
)


def _builder_for(files: list[Path], where: str) -> str:
    builders = {FILE_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise ValueError(f"{where} mixes JSON and Parquet files; keep one kind per dataset: {[str(f) for f in files]}")
    return builders.pop()


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` can be a hub dataset id (``"name"`` or ``"owner/name"``), not a local path."""
    if name.startswith((".", "/", "~")) or Path(name).suffix.lower() in FILE_BUILDERS:
        return False
    return bool(_HUB_ID.match(name))


def hub_offline() -> str | None:
    """The environment variable that turns the hub off (``HF_HUB_OFFLINE=1``), or ``None``."""
    for variable in _OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return variable
    return None


def local_path_meant(name: str) -> str | None:
    """Why a hub-looking ``name`` that is not on disk was probably meant as a local path, or ``None``."""
    first = Path(name).parts[0] if Path(name).parts else name
    if "/" in name and Path(first).is_dir():
        return f"the local folder {first!r} exists, so a local path was probably meant"
    parent = Path(name).parent
    siblings = sorted(p.name for p in parent.glob(f"{Path(name).name}.*") if p.suffix.lower() in FILE_BUILDERS)
    if parent.is_dir() and siblings:
        return f"did you mean {str(parent / siblings[0])!r}?"
    return None


# ------------------------------------------------------------------------------------------ reading JSON files


def _is_blank(path: Path) -> bool:
    with path.open("rb") as file:
        while chunk := file.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line, row)`` for each row of a JSON array file or a JSON Lines file; raises ``ValueError`` naming
    ``FILE:LINE`` at the first line that is not JSON."""
    text = path.read_text(encoding="utf-8", errors="replace")
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "[":  # one JSON array: each element's line
        decoder, position = json.JSONDecoder(), start + 1
        while True:
            position = len(text) - len(text[position:].lstrip())
            if text[position : position + 1] in ("]", ""):
                return
            line = text.count("\n", 0, position) + 1
            try:
                row, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{error.lineno}: not valid JSON: {error.msg} (column {error.colno})") from None
            yield line, row
            position = len(text) - len(text[position:].lstrip())
            if text[position : position + 1] == ",":
                position += 1
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            yield line, json.loads(content)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{line}: not valid JSON: {error.msg} (column {error.colno}); JSON Lines files hold one "
                "JSON object per line"
            ) from None


def _scan(path: Path) -> int:
    """The file's row count, reading it as :func:`_records` and checking that each row is an object whose values
    fit (:mod:`fastalign.data.values`); raises ``ValueError`` naming ``FILE:LINE``."""
    count = 0
    for line, row in _records(path):
        count += 1
        if not isinstance(row, dict):
            raise ValueError(
                f'{path}:{line}: expected a JSON object ({{"column": value, ...}}) per row, got {type(row).__name__}'
            )
        for column, value in row.items():
            problem = value_problem(column, value, row)
            if problem is not None:
                raise ValueError(f"{path}:{line}: {problem}")
    return count


def _locate(files: list[Path], index: int) -> str:
    """``FILE:LINE`` (JSON) or ``FILE: row N`` (Parquet, 1-based) of row ``index`` of the files read in order."""
    for path in files:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
            if index < rows:
                return f"{path}: row {index + 1}"
            index -= rows
            continue
        for line, _ in _records(path):
            if index == 0:
                return f"{path}:{line}"
            index -= 1
    return f"row {index}"  # pragma: no cover - the index is always within the files


def _where(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"


def _load_files(files: list[Path], split: str, where: str, **kwargs: Any) -> datasets.Dataset:
    """The files as split ``split`` (``"train[:10%]"`` slices them), their rows checked."""
    builder = _builder_for(files, where)
    base_split = split.split("[", 1)[0]
    for path in files:
        if builder == "json" and _is_blank(path):
            raise ValueError(f"no rows in {path}: the file is empty or holds only blank lines")
    data_files = {base_split: [str(f) for f in files]}
    try:
        whole = datasets.load_dataset(builder, data_files=data_files, split=base_split, **kwargs)
    except Exception as error:  # datasets, pyarrow and pandas report a bad line as chained tracebacks
        failure = error
    else:
        failure = None
    if failure is not None:
        # find the line ourselves (outside the except: one error, not a chain)
        if builder == "json" and sum(_scan(path) for path in files) == 0:
            raise ValueError(f"no rows in {_where(files)}")
        raise failure
    if len(whole) == 0:
        raise ValueError(f"no rows in {_where(files)}")
    check_values(whole, where=lambda index: _locate(files, index))
    if split == base_split:
        return whole
    return datasets.load_dataset(builder, data_files=data_files, split=split, **kwargs)


def _split_files(folder: Path) -> dict[str, list[Path]]:
    """The folder's data files by split, as the hub assigns them (``train*``, ``test*``, ``validation*`` ...;
    every file is ``train`` when none is named so)."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
    except EmptyDatasetError:
        return {}
    resolved = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    by_split = {}
    for split, files in resolved.items():
        kept = sorted(Path(f) for f in files if Path(f).suffix.lower() in FILE_BUILDERS)
        if kept:
            by_split[str(split)] = kept
    return by_split


def _missing_split(where: str, split: str, splits: list[str]) -> ValueError:
    return ValueError(
        f"{where} has no {split!r} split (its splits: {', '.join(splits)}); for held-out rows use {_SLICES}"
    )


def load_training_dataset(
    name_or_path: str | Path,
    *,
    split: str = "train",
    data_files: str | list[str] | dict[str, Any] | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """Load one split of a training dataset, with the splits ``datasets.load_dataset`` would give (TRL's
    ``dataset_train_split`` / ``dataset_test_split``):

    * a local ``.json`` / ``.jsonl`` / ``.parquet`` file: the ``train`` split (``split="train[:90%]"`` slices
      it); any other split is an error, so a single file never serves as its own held-out set;
    * a local folder: its ``.json`` / ``.jsonl`` / ``.parquet`` files (recursively, sorted) by split, as the hub
      assigns them by name (``train*``, ``test*`` / ``eval*``, ``validation*`` / ``dev*`` ...; every file is
      ``train`` when none is named so), or the ``data_files`` given (paths relative to the folder); one file kind
      per folder. A folder written by ``Dataset.save_to_disk`` is read with ``datasets.load_from_disk``;
    * anything else that looks like a hub id (``"name"`` or ``"owner/name"``): ``datasets.load_dataset(name,
      split=split, data_files=data_files, **kwargs)``.

    ``kwargs`` go to ``datasets.load_dataset`` (``name=``, ``revision=``, ``cache_dir=`` ...). The columns
    fastalign reads are checked (:func:`fastalign.data.values.check_values`), rows named ``FILE:LINE``.

    Raises:
        FileNotFoundError: the path does not exist and is not a hub id (or looks meant as a local path), the
            hub is off (``HF_HUB_OFFLINE``) and the dataset is not cached, or a folder holds no data files.
        ValueError: ``FILE:LINE: reason`` for a line that is not JSON or a value of the wrong kind; ``no rows in
            FILE``; an unsupported suffix; a folder that mixes JSON and Parquet; a split the data does not have.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    base_split = split.split("[", 1)[0]
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"unsupported data file {name!r}: expected one of {sorted(FILE_BUILDERS)}")
        if base_split != "train":
            raise _missing_split(f"the file {name!r} (one file is the 'train' split)", base_split, ["train"])
        return _load_files([path], split, f"file {name!r}", **kwargs)
    if path.is_dir():
        if data_files is None and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if not isinstance(loaded, datasets.DatasetDict):
                loaded = datasets.DatasetDict({"train": loaded})
            if base_split not in loaded:
                raise _missing_split(f"the saved dataset {name!r}", base_split, list(loaded))
            picked = loaded[base_split]
            if split != base_split:  # "train[:10%]": datasets' slice syntax, as load_dataset reads it
                spans = datasets.ReadInstruction.from_spec(split).to_absolute({base_split: len(picked)})
                picked = picked.select([i for span in spans for i in range(span.from_, span.to)])
            check_values(picked)
            return picked
        if data_files is None:
            by_split = _split_files(path)
            if not by_split:
                raise FileNotFoundError(f"no .json, .jsonl or .parquet files under the folder {name!r}")
            if base_split not in by_split:
                raise _missing_split(f"the folder {name!r}", base_split, list(by_split))
            return _load_files(by_split[base_split], split, f"folder {name!r}", **kwargs)
        dataset = datasets.load_dataset(name, data_files=data_files, split=split, **kwargs)
        check_values(dataset)
        return dataset
    if not looks_like_hub_id(name):
        raise FileNotFoundError(
            f"dataset {name!r} not found: no such local file or folder, and it is not a hub dataset id "
            "('name' or 'owner/name')"
        )
    intent = local_path_meant(name)
    if intent is not None:
        raise FileNotFoundError(f"dataset {name!r} not found: no such local file or folder ({intent})")
    offline = hub_offline()
    try:
        dataset = datasets.load_dataset(name, split=split, data_files=data_files, **kwargs)
    except ConnectionError:
        if offline is None:
            raise
        raise FileNotFoundError(
            f"dataset {name!r} not found: no such local file or folder, and {offline} is set, so it cannot be "
            "downloaded from the hub (it is not in the datasets cache either)"
        ) from None
    check_values(dataset)
    return dataset
