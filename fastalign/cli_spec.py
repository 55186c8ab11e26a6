"""A snapshot of every command's flags, so that ``fastalign COMMAND --help`` and flag errors answer in a fraction
of a second.

A command's real parser is ``transformers.HfArgumentParser`` over its config (a ``TrainingArguments``), and
building it imports torch, transformers and peft: 2-4 s before the first line of help. ``cli_spec.json`` holds
each parser's actions (flags, types, choices, defaults, help) as JSON; :func:`fast_parser` rebuilds a plain
``argparse`` parser from it that prints the same help and rejects the same unknown flags, missing values, bad
numbers and bad choices. The command line then goes through the real parser as well, so the snapshot only ever
answers early, never differently.

The snapshot is used only while its fingerprint matches: the installed transformers, accelerate and torch
versions and a hash of the source files that define the flags. Otherwise the real parser answers (slowly, but
right). After changing a command's flags, run ``make cli-spec`` (:func:`fastalign.cli.write_spec`) to rewrite the
snapshot; ``tests/cli/test_cli.py`` fails while it is stale.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

SPEC_PATH = Path(__file__).with_name("cli_spec.json")
_PACKAGE = Path(__file__).parent
# The files whose dataclasses define the commands' flags.
_SOURCES = ("commands.py", "cli_arguments.py", "trainers/configs.py")
_VERSIONED = ("transformers", "accelerate", "torch")
# Types the snapshot can rebuild; any other type (an enum, a config class) is checked by the real parser only.
_TYPES: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float}


def _string_to_bool(value: str) -> bool:
    """transformers' ``string_to_bool``: the same words, the same error."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )


_string_to_bool.__name__ = "string_to_bool"  # argparse names the type in its error message


def fingerprint() -> dict[str, str]:
    """What the snapshot depends on: library versions and the flag-defining sources' hash."""
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((_PACKAGE / name).read_bytes())
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {**versions, "sources": digest.hexdigest()}


def _jsonable(value: Any) -> Any:
    """``value`` if JSON keeps it as it is (so argparse shows and converts it the same), else its ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list) and all(isinstance(item, (bool, int, float, str)) for item in value):
        return value
    return str(value)


def _type_name(kind: Any) -> str | None:
    if kind is None:
        return None
    if getattr(kind, "__name__", None) == "string_to_bool":
        return "bool"
    if kind in (str, int, float):
        return kind.__name__
    return "other"


def describe(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A JSON-able description of ``parser``: its texts and, in order, every action that is not ``--help``."""
    if [group.title for group in parser._action_groups] != ["positional arguments", "options"]:
        raise ValueError("cli_spec describes parsers with the default argument groups only")
    actions = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        kind = type(action).__name__
        if kind not in ("_StoreAction", "_StoreTrueAction", "_StoreFalseAction", "_StoreConstAction"):
            raise ValueError(f"cli_spec cannot describe {kind} (flag {action.option_strings})")
        actions.append(
            {
                "action": kind,
                "option_strings": action.option_strings,
                "dest": action.dest,
                "nargs": action.nargs,
                "const": _jsonable(action.const),
                "default": _jsonable(action.default),
                "type": _type_name(action.type),
                "choices": None if action.choices is None else [str(getattr(c, "value", c)) for c in action.choices],
                "required": action.required,
                "help": action.help,
                "metavar": action.metavar,
            }
        )
    return {
        "prog": parser.prog,
        "description": parser.description,
        "epilog": parser.epilog,
        "formatter": parser.formatter_class.__name__,
        "actions": actions,
    }


_FORMATTERS = {cls.__name__: cls for cls in (argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter)}
_ACTIONS = {
    "_StoreAction": "store",
    "_StoreTrueAction": "store_true",
    "_StoreFalseAction": "store_false",
    "_StoreConstAction": "store_const",
}


def build(description: dict[str, Any]) -> argparse.ArgumentParser:
    """The ``argparse`` parser a :func:`describe` description stands for."""
    parser = argparse.ArgumentParser(
        prog=description["prog"],
        description=description["description"],
        epilog=description["epilog"],
        formatter_class=_FORMATTERS[description["formatter"]],
    )
    for spec in description["actions"]:
        options: dict[str, Any] = {
            "dest": spec["dest"],
            "default": spec["default"],
            "required": spec["required"],
            "help": spec["help"],
            "action": _ACTIONS[spec["action"]],
        }
        if spec["action"] in ("_StoreAction", "_StoreConstAction") and spec["const"] is not None:
            options["const"] = spec["const"]
        if spec["action"] == "_StoreAction":
            options["nargs"] = spec["nargs"]
            options["metavar"] = spec["metavar"]
            kind = spec["type"]
            options["type"] = _string_to_bool if kind == "bool" else _TYPES.get(kind, str)
            if spec["choices"] is not None:
                options["choices"] = spec["choices"]
                options["type"] = str
        elif spec["action"] == "_StoreConstAction":
            options["metavar"] = spec["metavar"]
        parser.add_argument(*spec["option_strings"], **options)
    return parser


def pack(descriptions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The snapshot file's content: the fingerprint, each distinct action once (the commands share most of
    ``TrainingArguments``), and each command's texts with the indices of its actions."""
    table: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    commands = {}
    for name, description in descriptions.items():
        positions = []
        for action in description["actions"]:
            key = json.dumps(action, sort_keys=True)
            if key not in index:
                index[key] = len(table)
                table.append(action)
            positions.append(index[key])
        commands[name] = {**description, "actions": positions}
    return {"fingerprint": fingerprint(), "actions": table, "commands": commands}


@functools.cache
def load() -> dict[str, Any] | None:
    """The snapshot's command descriptions, or ``None`` when it is missing or its fingerprint does not match."""
    try:
        snapshot = json.loads(SPEC_PATH.read_text())
    except (OSError, ValueError):
        return None
    if snapshot.get("fingerprint") != fingerprint():
        return None
    table = snapshot["actions"]
    return {
        name: {**command, "actions": [table[i] for i in command["actions"]]}
        for name, command in snapshot["commands"].items()
    }


def fast_parser(name: str) -> argparse.ArgumentParser | None:
    """Command ``name``'s parser from the snapshot, or ``None`` (then only the real parser can answer)."""
    commands = load()
    if commands is None or name not in commands:
        return None
    return build(commands[name])
