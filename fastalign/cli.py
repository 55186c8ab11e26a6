"""The ``fastalign`` command: one sub-command per training stage, configured like TRL's scripts.

    fastalign sft --config sft.yaml --learning_rate 1e-5 --max_steps 100

Flags are the field names of the stage's config (``SFTConfig`` ...), of ``ModelConfig`` (``--model_name_or_path``,
``--dtype``, ``--use_peft`` ...) and of ``ScriptArguments`` (``--dataset_name`` ...). A YAML file passed with
``--config`` uses the same keys; flags on the command line override it.

``fastalign grpo`` and ``fastalign ppo`` add TRL's GRPO script flags (``--reward_funcs``,
``--reward_model_name_or_path``);
``fastalign distill`` distils a student from a frozen teacher (``--teacher_model_name_or_path``, same tokenizer);
``fastalign rejection-sample`` samples k completions per prompt, keeps the best (or those above a threshold) and
writes an SFT dataset (:mod:`fastalign.sampling`). ``fastalign pipeline recipe.yaml`` chains stages
(:mod:`fastalign.pipeline`).

This module holds ``main``, the top-level help and ``make cli-spec``; the commands themselves (their dataclasses,
the runner, the parsers) are in :mod:`fastalign.commands`.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from fastalign import cli_spec, commands


def write_spec() -> None:
    """Rewrite cli_spec's snapshot from every command's real parser (``make cli-spec``)."""
    snapshot = cli_spec.pack({name: cli_spec.describe(commands.build_parser(name)) for name in commands.COMMANDS})
    cli_spec.SPEC_PATH.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    print(f"fastalign: wrote {cli_spec.SPEC_PATH}", file=sys.stderr)


def _top_level_help() -> str:
    lines = ["usage: fastalign COMMAND [--config FILE.yaml] [--FIELD VALUE ...]", "", "commands:"]
    width = max(map(len, commands.COMMANDS))
    lines += [f"  {name:{width}s}  {command.summary}" for name, command in commands.COMMANDS.items()]
    lines += [f"  {'pipeline':{width}s}  run a recipe of these commands stage by stage (built-in: rlhf, dpo, r1)"]
    lines += [f"  {'demo':{width}s}  the r1 recipe end to end on CPU: a synthetic task, a tiny model from scratch"]
    lines += [
        "",
        "`fastalign COMMAND --help` lists the command's fields (TRL's names: --model_name_or_path, --dataset_name,",
        "--output_dir, --max_steps, --learning_rate, --per_device_train_batch_size, ...).",
        "",
        "example:",
        "  fastalign sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name data.jsonl --output_dir out",
        "  fastalign grpo --model_name_or_path sft-out --dataset_name prompts.jsonl --output_dir grpo \\",
        "      --reward_funcs accuracy_reward think_format_reward --reward_weights 1.0 0.5",
        "  fastalign distill --model_name_or_path small-sft --teacher_model_name_or_path grpo \\",
        "      --dataset_name prompts.jsonl --lmbda 0.5 --beta 0.5 --output_dir distilled",
        "  fastalign rejection-sample --model_name_or_path grpo --dataset_name prompts.jsonl \\",
        "      --reward_funcs accuracy_reward --num_generations 8 --output_path r1-sft.jsonl",
        "  fastalign pipeline rlhf --output_dir runs/rlhf --set model_name_or_path=Qwen/Qwen2.5-0.5B \\",
        "      --set sft_dataset=sft.jsonl --set preference_dataset=pairs.jsonl --set prompt_dataset=prompts.jsonl",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return
    name, rest = argv[0], argv[1:]
    if name == "pipeline":
        from fastalign.pipeline import main as pipeline_main

        pipeline_main(rest)
        return
    if name == "demo":  # imported here: fastalign.demo imports transformers, and `fastalign --help` must not
        from fastalign.demo import main as demo_main

        demo_main(rest)
        return
    if name not in commands.COMMANDS:
        raise SystemExit(f"fastalign: unknown command {name!r}\n\n{_top_level_help()}")
    commands.check_fast(name, rest)
    commands.run(name, *commands.parse(name, rest))


# The names that moved out of this module, for one release: where each lives now.
_MOVED = {
    "BUILTIN_REWARDS": "fastalign.rewards.resolve",
    "COMMANDS": "fastalign.commands",
    "build_parser": "fastalign.commands",
    "check_fast": "fastalign.commands",
    "check_inputs": "fastalign.commands",
    "command_parser": "fastalign.commands",
    "parse": "fastalign.commands",
    "reward_functions_from_names": "fastalign.commands",
    "values_to_argv": "fastalign.commands",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"fastalign.cli.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
