"""Loading a training dataset from a local file, a folder of files, or the Hugging Face hub."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets

# Local file suffixes and the `datasets` builder that reads them.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A hub dataset id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def _builder_for(files: list[Path], where: str) -> str:
    builders = {FILE_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise ValueError(f"{where} mixes JSON and Parquet files; keep one kind per dataset: {[str(f) for f in files]}")
    return builders.pop()


def _looks_like_hub_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or Path(name).suffix.lower() in FILE_BUILDERS:
        return False
    return bool(_HUB_ID.match(name))


def load_training_dataset(
    name_or_path: str | Path,
    *,
    split: str = "train",
    data_files: str | list[str] | dict[str, Any] | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """Load one split of a training dataset.

    * a local ``.json`` / ``.jsonl`` / ``.parquet`` file: read by the ``json`` / ``parquet`` builder; the file
      is the requested ``split`` (so ``split="train[:100]"`` slices it);
    * a local folder: every ``.json`` / ``.jsonl`` / ``.parquet`` file under it (recursively, sorted), or the
      ``data_files`` given (paths relative to the folder); one file kind per folder. A folder written by
      ``Dataset.save_to_disk`` is read with ``datasets.load_from_disk``;
    * anything else that looks like a hub id (``"name"`` or ``"owner/name"``): ``datasets.load_dataset(name,
      split=split, data_files=data_files, **kwargs)``.

    ``kwargs`` go to ``datasets.load_dataset`` (``name=``, ``revision=``, ``cache_dir=`` ...).

    Raises:
        FileNotFoundError: the path does not exist and is not a hub id, or a folder holds no data files.
        ValueError: a file has an unsupported suffix, or a folder mixes JSON and Parquet.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    base_split = split.split("[", 1)[0]
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"unsupported data file {name!r}: expected one of {sorted(FILE_BUILDERS)}")
        builder = FILE_BUILDERS[path.suffix.lower()]
        return datasets.load_dataset(builder, data_files={base_split: str(path)}, split=split, **kwargs)
    if path.is_dir():
        if data_files is None and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if data_files is None:
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in FILE_BUILDERS)
            if not files:
                raise FileNotFoundError(f"no .json, .jsonl or .parquet files under the folder {name!r}")
            return datasets.load_dataset(
                _builder_for(files, f"folder {name!r}"),
                data_files={base_split: [str(f) for f in files]},
                split=split,
                **kwargs,
            )
        return datasets.load_dataset(name, data_files=data_files, split=split, **kwargs)
    if not _looks_like_hub_id(name):
        raise FileNotFoundError(
            f"dataset {name!r} not found: no such local file or folder, and it is not a hub dataset id "
            "('name' or 'owner/name')"
        )
    return datasets.load_dataset(name, split=split, data_files=data_files, **kwargs)
