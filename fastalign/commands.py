"""The ``fastalign`` sub-commands: the table of commands, the one runner, and the parsers that make a command's
dataclasses from a command line (with its ``--config`` YAML file) or from a mapping of field names to values.

Each command (:data:`COMMANDS`) names its three dataclasses (script arguments, ``ModelConfig``, its config), the
defaults it changes, the trainer it runs and what that trainer loads; :func:`run` does the rest the same way for
every trainer. :mod:`fastalign.cli` (``main`` and the top-level help), :mod:`fastalign.pipeline` and
:mod:`fastalign.demo` build on this module; it imports none of them.

torch, transformers and the configs are imported when a command runs (or its real parser is built), so that
``fastalign --help``, ``fastalign COMMAND --help`` and flag errors answer at once (cli_spec's snapshot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fastalign import cli_spec

if TYPE_CHECKING:
    from transformers import HfArgumentParser

    from fastalign.cli_arguments import RejectionSamplingArguments, RewardArguments
    from fastalign.trainers.configs import ModelConfig, ScriptArguments


@dataclass(frozen=True)
class Command:
    """A sub-command: its one-line summary, its dataclasses and the defaults it changes (its flags), and what
    :func:`run` does with it.

    ``config`` and ``script`` name dataclasses of fastalign.trainers.configs or fastalign.cli_arguments (imported
    when the parser is built). ``trainer`` names a class of fastalign.trainers (``None``: rejection sampling),
    which trains ``model`` (``"causal_lm"`` or ``"reward_model"``; ``from_scratch``: a folder holding only
    ``config.json`` is a random init). ``dataset_format`` is the trainer whose columns the dataset must have.
    ``completion_length`` names the config field that bounds a completion, for the commands scored by
    ``--reward_funcs`` and ``--reward_model_name_or_path``; ``teacher`` the config field holding a frozen
    teacher's path (loaded with the student's ``ModelConfig``)."""

    summary: str
    config: str
    dataset_format: str
    trainer: str | None = None
    script: str = "ScriptArguments"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    model: str = "causal_lm"
    from_scratch: bool = False
    completion_length: str | None = None
    teacher: str | None = None


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        "pre-train a causal LM on `text` data with packing (from a config-only folder: from scratch)",
        config="SFTConfig",
        dataset_format="sft",
        trainer="SFTTrainer",
        defaults={"packing": True, "completion_only_loss": False},
        from_scratch=True,
    ),
    "sft": Command(
        "supervised fine-tuning on text, messages or prompt-completion data",
        config="SFTConfig",
        dataset_format="sft",
        trainer="SFTTrainer",
    ),
    "reward": Command(
        "a Bradley-Terry reward model on preference pairs (prompt, chosen, rejected)",
        config="RewardConfig",
        dataset_format="reward",
        trainer="RewardTrainer",
        model="reward_model",
    ),
    # No ref_model: DPOTrainer uses the LoRA base with adapters disabled (--use_peft), precomputed reference
    # log-probs (--precompute_ref_log_probs), or a frozen copy of the starting policy.
    "dpo": Command(
        "direct preference optimisation (every DPO loss_type) on preference pairs",
        config="DPOConfig",
        dataset_format="dpo",
        trainer="DPOTrainer",
    ),
    "grpo": Command(
        "GRPO / DAPO / Dr. GRPO on prompts, with --reward_funcs and/or --reward_model_name_or_path",
        config="GRPOConfig",
        dataset_format="grpo",
        trainer="GRPOTrainer",
        script="GRPOScriptArguments",
        completion_length="max_completion_length",
    ),
    # The value model starts from a copy of the policy's backbone with a fresh value head (PPOTrainer's default).
    "ppo": Command(
        "PPO with a value model (RLHF), with --reward_model_name_or_path and/or --reward_funcs",
        config="PPOConfig",
        dataset_format="ppo",
        trainer="PPOTrainer",
        script="GRPOScriptArguments",
        completion_length="response_length",
    ),
    # The teacher is --teacher_model_name_or_path (a DistillConfig field), loaded like the student (--dtype ...);
    # a student folder holding only config.json starts from a random init, a teacher must have weights.
    "distill": Command(
        "distil a student from a frozen teacher (--teacher_model_name_or_path), on its samples and/or the data's",
        config="DistillConfig",
        dataset_format="distill",
        trainer="DistillTrainer",
        teacher="teacher_model_name_or_path",
        from_scratch=True,
    ),
    "rejection-sample": Command(
        "sample k completions per prompt, keep the best by reward, write prompt-completion JSONL for sft",
        config="RejectionSamplingArguments",
        dataset_format="rl",
    ),
}

_PEFT_TASK = {"causal_lm": "CAUSAL_LM", "reward_model": "SEQ_CLS"}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# ------------------------------------------------------------------------------------------------------ parsers


def _dataclass(name: str) -> type:
    from fastalign import cli_arguments
    from fastalign.trainers import configs

    return getattr(configs, name, None) or getattr(cli_arguments, name)


def _dataclasses(name: str) -> tuple[type, type, type]:
    """Command ``name``'s script arguments, ``ModelConfig`` and config classes, in the order it parses into."""
    from fastalign.trainers.configs import ModelConfig

    command = COMMANDS[name]
    return _dataclass(command.script), ModelConfig, _dataclass(command.config)


_CONFIG_HELP = "a YAML file of field: value (same names as the flags)"


def build_parser(name: str) -> HfArgumentParser:
    """Command ``name``'s real parser: ``HfArgumentParser`` over its dataclasses (imports transformers)."""
    from transformers import HfArgumentParser

    command = COMMANDS[name]
    parser = HfArgumentParser(
        _dataclasses(name),
        prog=f"fastalign {name}",
        description=command.summary,
        epilog="Every flag can also be a key of the YAML file given with --config; flags override the file.",
    )
    parser.add_argument("--config", help=_CONFIG_HELP)
    parser.set_defaults(**command.defaults)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """A parser with command ``name``'s flags: the snapshot's when it matches (fast), else the real one."""
    return cli_spec.fast_parser(name) or build_parser(name)


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions} - {"help", "config"}


def field_names(name: str) -> set[str]:
    """The field names (flag destinations) command ``name`` accepts (from the snapshot when it matches)."""
    return _dests(command_parser(name))


def _refuse_unknown(values: Mapping[str, Any], known: set[str], source: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"{source} has unknown fields {unknown}; see --help for the accepted ones")


def _text(value: Any) -> str:
    """A value as its flag's text: YAML's true/false, JSON for a mapping."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def values_to_argv(values: Mapping[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """A mapping of field names to values as command-line flags; unknown names are an error naming ``source``."""
    _refuse_unknown(values, _dests(parser), source)
    argv = []
    for key, value in values.items():
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None:
            argv += [f"--{key}", _text(value)]
    return argv


def _yaml_to_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The YAML file's keys as command-line flags (placed first, so later flags override them)."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise SystemExit(f"--config: cannot read {path}: {error.strerror}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config: {path} must hold a mapping of field names to values")
    return values_to_argv(values, parser, f"--config: {path}")


def _command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The YAML file's flags (``--config``), then ``argv``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    return [*(_yaml_to_argv(known.config, parser) if known.config else []), *argv]


def check_fast(name: str, argv: Sequence[str]) -> bool:
    """Answer ``--help`` and flag errors for command ``name`` from cli_spec's snapshot, before torch and
    transformers load: prints and exits as the real parser would. ``False`` when the snapshot does not match the
    installed libraries (then :func:`parse` answers)."""
    parser = cli_spec.fast_parser(name)
    if parser is None:
        return False
    namespace = parser.parse_args(_command_line(parser, argv))
    if namespace.model_name_or_path is None:
        parser.error("--model_name_or_path is required")
    return True


def parse(name: str, argv: Sequence[str]) -> tuple[Any, ModelConfig, Any]:
    """Command ``name``'s dataclasses from the command line (and its ``--config`` YAML file)."""
    parser = build_parser(name)
    *parsed, remaining = parser.parse_args_into_dataclasses(
        args=_command_line(parser, argv), return_remaining_strings=True
    )
    if remaining:  # HfArgumentParser raises a ValueError (a traceback) for these; argparse's usage error instead
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    script, model_args, config, _ = parsed
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required")
    return script, model_args, config


def _has_type(value: Any, kind: Any) -> bool:
    """Whether ``value`` is already what the flag's converter ``kind`` makes (so it is kept as it is)."""
    if isinstance(value, bool):
        return getattr(kind, "__name__", None) == "string_to_bool"
    return (kind is int and isinstance(value, int)) or (kind is float and isinstance(value, (int, float)))


def _field_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """One field's value as :func:`parse` would make it from the same flag: a value of the field's type is
    kept; anything else (text: YAML 1.1 reads ``1e-5`` as a string) goes through the flag's converter; a list
    for a list field item by item. Raises ``argparse.ArgumentError`` with the parser's message."""
    many = action.nargs in ("+", "*")
    items, text = (value, str) if isinstance(value, list) else ([value], _text)  # as values_to_argv writes them
    if not items:
        raise argparse.ArgumentError(action, f"expected {'at least ' if many else ''}one argument")
    if not many and len(items) > 1:  # what the same flag given these values would leave over
        raise argparse.ArgumentError(None, f"unrecognized arguments: {' '.join(map(str, items[1:]))}")
    converted = []
    for item in items:
        if _has_type(item, action.type):
            item = float(item) if action.type is float else item
        else:
            item = parser._get_value(action, text(item))
        if action.choices is not None:
            parser._check_value(action, item)
        converted.append(item)
    return converted if many else converted[0]


def configs(name: str, values: Mapping[str, Any], source: str) -> tuple[Any, ModelConfig, Any]:
    """Command ``name``'s dataclasses from a mapping of field names to values (a pipeline stage's args), equal to
    what :func:`parse` makes of the same flags: each value is read by its field's converter (:func:`_field_value`),
    ``None`` leaves the field's default; a bad value is the parser's usage error, an unknown name an error naming
    ``source``."""
    parser = build_parser(name)
    _refuse_unknown(values, _dests(parser), source)
    # by flag, as values_to_argv writes them: a bool field's `--no_FIELD` has the same dest
    actions = {option[2:]: action for action in parser._actions for option in action.option_strings}
    given = dict(COMMANDS[name].defaults)
    try:
        given.update(
            {key: _field_value(parser, actions[key], value) for key, value in values.items() if value is not None}
        )
    except argparse.ArgumentError as error:
        parser.error(str(error))
    if given.get("model_name_or_path") is None:
        parser.error("--model_name_or_path is required")
    script, model_args, config = (
        cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.init and f.name in given})
        for cls in _dataclasses(name)
    )
    return script, model_args, config


# ------------------------------------------------------------------------------------------------------- inputs


def _check_model_paths(*paths: str | None, teacher: str | None = None) -> None:
    """A missing local model folder (``--model_name_or_path``, ``--reward_model_name_or_path``,
    ``--teacher_model_name_or_path``) fails here, before any data or model loads, instead of as transformers' hub
    repo-id error."""
    from fastalign.models.paths import missing_model_folder

    flags = ("--model_name_or_path", "--reward_model_name_or_path")
    for flag, path in [*zip(flags, paths, strict=False), ("--teacher_model_name_or_path", teacher)]:
        problem = missing_model_folder(path) if path is not None else None
        if problem is not None:
            raise SystemExit(f"{flag}: {problem}")


def _teacher_path(command: Command, config: Any) -> str | None:
    """The teacher's path of a distillation command (required), else None."""
    if command.teacher is None:
        return None
    path = getattr(config, command.teacher)
    if path is None:
        raise SystemExit(f"--{command.teacher} is required (the frozen teacher: a local folder or a hub model name)")
    return path


def _load_dataset(flag: str, name: str, split: str, **options: Any):
    """``load_training_dataset``, its errors (``FILE:LINE: reason``, ``no rows in FILE``, a missing split) as one
    line naming the flag."""
    from fastalign.data import load_training_dataset

    try:
        return load_training_dataset(name, split=split, **options)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{flag}: {error}") from None


def _datasets(script: ScriptArguments, config: Any, evaluate: bool | None = None):
    """The train split and, when ``config.eval_strategy`` evaluates, the held-out ``--dataset_test_split`` (TRL's
    scripts: ``dataset[dataset_test_split]``); evaluating on the training split is refused."""
    if script.dataset_name is None:
        raise SystemExit("--dataset_name is required (a local JSON/JSONL/Parquet file or folder, or a hub name)")
    options = {"name": script.dataset_config} if script.dataset_config else {}
    strategy = getattr(config, "eval_strategy", "no")
    strategy = getattr(strategy, "value", strategy)
    evaluate = strategy != "no" if evaluate is None else evaluate
    if evaluate and script.dataset_test_split == script.dataset_train_split:
        raise SystemExit(
            f"--eval_strategy {strategy} evaluates on --dataset_test_split, which is the training split "
            f"{script.dataset_train_split!r}: give a held-out split (e.g. --dataset_train_split 'train[:90%]' "
            "--dataset_test_split 'train[90%:]') or --eval_strategy no"
        )
    train = _load_dataset("--dataset_name", script.dataset_name, script.dataset_train_split, **options)
    if not evaluate:
        return train, None
    flag = f"--dataset_test_split {script.dataset_test_split!r} (--eval_strategy {strategy} evaluates on it)"
    return train, _load_dataset(flag, script.dataset_name, script.dataset_test_split, **options)


def check_inputs(
    name: str,
    script: Any,
    model_args: ModelConfig,
    config: Any,
    produced: Callable[[str], bool] = lambda path: False,
) -> None:
    """Check command ``name``'s inputs that exist now, without running it: its local model folders, its dataset
    (every split it reads, and that it fits the command's trainer) and ``--mix_dataset``; the paths ``produced``
    says an earlier stage writes are skipped, and so are hub datasets while the hub is reachable (they are
    checked when the command runs). ``fastalign pipeline`` calls it for every stage before the first one runs.

    Raises:
        SystemExit: one line naming the flag, and the file:line, row and column when the data is to blame.
    """
    from fastalign.data import require_format
    from fastalign.data.load import hub_offline, local_path_meant, looks_like_hub_id

    command = COMMANDS[name]
    reward_model = getattr(script, "reward_model_name_or_path", None) or getattr(
        config, "reward_model_name_or_path", None
    )
    models = (model_args.model_name_or_path, reward_model)
    teacher = _teacher_path(command, config)
    _check_model_paths(
        *(None if path is None or produced(path) else path for path in models),
        teacher=None if teacher is None or produced(teacher) else teacher,
    )

    def checkable(dataset: str | None) -> bool:
        if dataset is None or produced(dataset):
            return False
        on_hub = looks_like_hub_id(dataset) and not Path(dataset).expanduser().exists()
        return not on_hub or hub_offline() is not None or local_path_meant(dataset) is not None

    if checkable(script.dataset_name):
        train, held_out = _datasets(script, config, evaluate=False if command.trainer is None else None)
        for flag, dataset in (("--dataset_name", train), ("--dataset_test_split", held_out)):
            if dataset is None:
                continue
            try:
                found = require_format(dataset, command.dataset_format)
            except ValueError as error:
                raise SystemExit(f"{flag} {script.dataset_name}: {error}") from None
            if command.teacher is not None and config.lmbda < 1 and found != "prompt_completion":
                raise SystemExit(
                    f"{flag} {script.dataset_name}: --lmbda {config.lmbda} trains on the dataset's completions in "
                    f"{1 - config.lmbda:.0%} of the batches, but it has no 'completion' column (columns: "
                    f"{sorted(dataset.column_names)}); add one or give --lmbda 1"
                )
    mix = getattr(config, "mix_dataset", None)
    if checkable(mix):
        try:
            require_format(_load_dataset("--mix_dataset", mix, config.mix_dataset_split), "sft")
        except ValueError as error:
            raise SystemExit(f"--mix_dataset {mix}: {error}") from None


def _check_output_path(output_path: str, inputs: dict[str, str | None]) -> None:
    """Refuse an output file that is one of the inputs, or inside an input folder (compared resolved)."""
    output = Path(output_path).expanduser().resolve()
    for flag, name in inputs.items():
        source = Path(name).expanduser().resolve() if name is not None else None
        if source is not None and source.exists() and (output == source or source in output.parents):
            where = "is" if output == source else "is inside"
            raise SystemExit(
                f"--output_path {output_path} {where} the input {flag} {name}: writing it would "
                "overwrite the input; give another --output_path"
            )


# ------------------------------------------------------------------------------------------------------ rewards

# The argument names in fastalign.rewards.resolve's messages, and a list item's index after them.
_ARGUMENT = re.compile(r"\b(reward_funcs|reward_weights|soft_punish_cache)\b(\[\d+\])?")


def _flag_error(error: Exception) -> SystemExit:
    """A resolve_reward_funcs error as one line naming the flags as the command line spells them
    (``--reward_funcs``, not ``reward_funcs[0]``; a weight keeps its index)."""

    def flag(match: re.Match) -> str:
        index = match[2] if match[1] == "reward_weights" and match[2] else ""
        return f"--{match[1]}{index}"

    return SystemExit(_ARGUMENT.sub(flag, str(error)))


def reward_functions_from_names(
    names: Sequence[str] | None, max_completion_length: int, soft_punish_cache: int | None = None
) -> list[Callable[..., list] | str]:
    """The ``--reward_funcs`` names as reward functions (:func:`fastalign.rewards.resolve.resolve_reward_funcs`:
    the built-ins, ``module.path:function``), checked before any model loads: a sandboxed ``code_reward`` checks
    its sandbox now. A reward model's path stays a path (loaded with ``--reward_model_name_or_path``)."""
    from fastalign.rewards import SandboxUnavailableError
    from fastalign.rewards.resolve import resolve_reward_funcs

    if not names:
        return []
    try:
        functions, _ = resolve_reward_funcs(
            list(names),
            max_completion_length=max_completion_length,
            soft_punish_cache=soft_punish_cache,
            load_models=False,
        )
    except (TypeError, ValueError, SandboxUnavailableError) as error:
        raise _flag_error(error) from None
    return functions


def _reward_setup(args: RewardArguments, weights: Sequence[float] | None, max_completion_length: int) -> list:
    """The named reward functions, checked (with the weights) before any model is loaded."""
    from fastalign.models.paths import missing_model_folder
    from fastalign.rewards.resolve import resolve_reward_weights

    named = reward_functions_from_names(args.reward_funcs, max_completion_length, args.soft_punish_cache)
    for problem in (missing_model_folder(item) for item in named if isinstance(item, str)):
        if problem is not None:
            raise SystemExit(f"--reward_funcs: {problem}")
    count = len(named) + (args.reward_model_name_or_path is not None)
    if count == 0:
        raise SystemExit("no reward: give --reward_funcs and/or --reward_model_name_or_path")
    try:  # the message gives the order whether or not there is a reward model
        resolve_reward_weights(weights, count, reward_model_first=True)
    except (TypeError, ValueError) as error:
        raise _flag_error(error) from None
    return named


def _with_reward_model(args: RewardArguments, named: list, model_args: ModelConfig, tokenizer: Any, device: Any):
    """The reward model (first, as in TRL's script), then the named functions; each reward model on ``device``
    in ``--dtype``, with its own tokenizer (the policy's when its folder has none)."""
    from fastalign.rewards.resolve import resolve_reward_funcs

    functions, _ = resolve_reward_funcs(
        named,
        reward_model=args.reward_model_name_or_path,
        tokenizer=tokenizer,
        device=device,
        dtype=_torch_dtype(model_args.dtype),
        trust_remote_code=model_args.trust_remote_code,
    )
    return functions


# ------------------------------------------------------------------------------------------------------- models


def _torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, got {name!r}")
    return dtype


def _load_tokenizer(model_args: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )


def _load_model(command: Command, model_args: ModelConfig):
    """The model ``command`` trains (or samples from); with ``from_scratch``, a folder holding only
    ``config.json`` gives a random init (pre-training)."""
    from fastalign.models import load_causal_lm, load_reward_model

    path = Path(model_args.model_name_or_path)
    if command.from_scratch and path.is_dir() and not any((path / name).exists() for name in _WEIGHT_FILES):
        from transformers import AutoConfig, AutoModelForCausalLM

        from fastalign.models import select_attention_implementation

        config = AutoConfig.from_pretrained(path)
        attention = select_attention_implementation(model_args.attn_implementation)
        print(f"fastalign: no weights in {path}: initialising {config.model_type} from its config", file=sys.stderr)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    load = load_reward_model if command.model == "reward_model" else load_causal_lm
    return load(
        model_args.model_name_or_path,
        dtype=_torch_dtype(model_args.dtype),
        attn_implementation=model_args.attn_implementation,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )


def _peft_config(model_args: ModelConfig, task_type: str):
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise SystemExit("--use_peft needs peft: pip install 'fastalign[peft]'") from None
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        task_type=task_type,
    )


# ------------------------------------------------------------------------------------------------------- runner


def run(name: str, script: Any, model_args: ModelConfig, config: Any) -> None:
    """Runs command ``name`` on its dataclasses (from :func:`parse` or :func:`configs`): first what fails without
    loading a model (reward names and weights, model folders, datasets), then the tokenizer, the reward model,
    the model and the trainer; trains, and saves the model and ``trainer_state.json`` to ``output_dir``."""
    command = COMMANDS[name]
    if command.trainer is None:
        _rejection_sample(script, model_args, config)
        return
    from fastalign import trainers
    from fastalign.trainers.distill import teacher_tokenizer

    named = None
    if command.completion_length is not None:
        named = _reward_setup(script, config.reward_weights, getattr(config, command.completion_length))
    teacher = _teacher_path(command, config)
    _check_model_paths(
        model_args.model_name_or_path, getattr(script, "reward_model_name_or_path", None), teacher=teacher
    )
    train, evaluate = _datasets(script, config)
    tokenizer = _load_tokenizer(model_args)
    rewards = {}
    if named is not None:
        rewards["reward_funcs"] = _with_reward_model(script, named, model_args, tokenizer, config.device)
    if teacher is not None:  # loaded as the student is (dtype, attention), at the teacher's revision
        revision = getattr(config, "teacher_model_revision", None) or "main"
        teacher_args = dataclasses.replace(model_args, model_name_or_path=teacher, model_revision=revision)
        rewards["teacher_model"] = _load_model(dataclasses.replace(command, from_scratch=False), teacher_args)
        rewards["teacher_processing_class"] = teacher_tokenizer(teacher, revision, model_args.trust_remote_code)
    trainer = getattr(trainers, command.trainer)(
        _load_model(command, model_args),
        args=config,
        train_dataset=train,
        eval_dataset=evaluate,
        processing_class=tokenizer,
        peft_config=_peft_config(model_args, _PEFT_TASK[command.model]),
        **rewards,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (losses, rewards, num_tokens, train_runtime)
    print(f"fastalign: model saved to {config.output_dir}", file=sys.stderr)


def _rejection_sample(script: ScriptArguments, model_args: ModelConfig, args: RejectionSamplingArguments) -> None:
    import torch

    from fastalign.rollout import SamplingParams
    from fastalign.sampling import mix_datasets, rejection_sample, save_jsonl

    if args.output_path is None:
        raise SystemExit("--output_path is required (the JSONL file to write)")
    _check_output_path(args.output_path, {"--dataset_name": script.dataset_name, "--mix_dataset": args.mix_dataset})
    named = _reward_setup(args, args.reward_weights, args.max_completion_length)
    _check_model_paths(model_args.model_name_or_path, args.reward_model_name_or_path)
    try:
        params = SamplingParams(
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k or None,
        )
    except (TypeError, ValueError) as error:
        raise SystemExit(f"fastalign rejection-sample: {error}") from None
    prompts, _ = _datasets(script, None, evaluate=False)
    mix = None
    if args.mix_dataset is not None:  # loaded before sampling, so that a bad path fails at once
        mix = _load_dataset("--mix_dataset", args.mix_dataset, args.mix_dataset_split)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = _load_tokenizer(model_args)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_model(COMMANDS["rejection-sample"], model_args).to(device)
    reward_funcs = _with_reward_model(args, named, model_args, tokenizer, device)
    stats: dict[str, Any] = {}
    sampled = rejection_sample(
        model,
        tokenizer,
        prompts,
        reward_funcs,
        args.reward_weights,
        params=params,
        keep=args.keep,
        threshold=args.threshold,
        batch_size=args.batch_size,
        seed=args.seed,
        max_prompt_length=args.max_prompt_length,
        skip_truncated=args.skip_truncated,
        deduplicate=args.deduplicate,
        progress=not args.disable_tqdm,
        stats=stats,
    )
    kept = len(sampled)
    if kept == 0:  # an empty file would only fail the next stage
        best = "none scored" if stats["best_reward"] is None else f"the best reward was {stats['best_reward']:.4g}"
        raise SystemExit(
            f"fastalign rejection-sample: kept 0 of {stats['sampled']} sampled completions ({stats['prompts']} "
            f"prompts x {args.num_generations}; --keep {args.keep}, --threshold {args.threshold}, {best}; "
            f"{stats['unscored']} unscored, {stats['truncated']} truncated"
            f"{' and skipped (--skip_truncated)' if args.skip_truncated else ''}): nothing written to "
            f"{args.output_path}; lower --threshold or sample more (--num_generations)"
        )
    mean = f"{sum(sampled['reward']) / kept:.4f}" if kept else "n/a"
    output = mix_datasets(sampled, mix, args.mix_ratio, seed=args.seed) if mix is not None else sampled
    path = save_jsonl(output, args.output_path)
    mixed = f", {len(output) - kept} rows mixed in from {args.mix_dataset}" if mix is not None else ""
    print(
        f"fastalign: rejection-sample: {len(prompts)} prompts x {args.num_generations} completions, kept {kept} rows "
        f"(mean reward {mean}){mixed}; wrote {len(output)} rows to {path}",
        file=sys.stderr,
    )
