"""A missing local model folder, told apart from a hub model id before transformers turns the path into a hub
request (which answers ``Repo id must use alphanumeric chars ...`` or waits for the network)."""

from __future__ import annotations

import os
from pathlib import Path


def missing_model_folder(name_or_path: str | os.PathLike) -> str | None:
    """Why ``name_or_path`` is a local model folder that does not exist, or ``None`` (it exists, or it can be a
    hub id ``name`` / ``owner/name``).

    A path is local when it starts with ``.``, ``/`` or ``~``, ends with a separator, has more than two parts
    (a hub id has at most one ``/``), or its first part is an existing folder.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        return None
    parts = Path(name).parts
    local = (
        name.startswith((".", "/", "~"))
        or name.endswith(("/", os.sep))
        or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())
    )
    if not local:
        return None
    full = path.absolute()
    nearest = next(parent for parent in full.parents if parent.is_dir())
    return f"the model folder {name!r} does not exist ({full}; the nearest folder that exists is {nearest})"


def check_model_path(name_or_path: str | os.PathLike) -> None:
    """Raise ``FileNotFoundError`` for a missing local model folder (:func:`missing_model_folder`)."""
    problem = missing_model_folder(name_or_path)
    if problem is not None:
        raise FileNotFoundError(problem)
