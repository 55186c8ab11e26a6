"""The ``fastalign`` command: one sub-command per training stage, configured like TRL's scripts.

    fastalign sft --config sft.yaml --learning_rate 1e-5 --max_steps 100

Flags are the field names of the stage's config (``SFTConfig`` ...), of ``ModelConfig`` (``--model_name_or_path``,
``--dtype``, ``--use_peft`` ...) and of ``ScriptArguments`` (``--dataset_name`` ...). A YAML file passed with
``--config`` uses the same keys; flags on the command line override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from fastalign.trainers.configs import DPOConfig, ModelConfig, RewardConfig, ScriptArguments, SFTConfig

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class Command:
    summary: str
    config: type
    run: Callable[[ScriptArguments, ModelConfig, Any], None]
    defaults: dict[str, Any]


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


def _load_policy(model_args: ModelConfig, from_scratch_ok: bool):
    """The causal LM to train; for pre-training, a folder holding only ``config.json`` gives a random init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastalign.models import load_causal_lm, select_attention_implementation

    path = Path(model_args.model_name_or_path)
    if from_scratch_ok and path.is_dir() and not any((path / name).exists() for name in _WEIGHT_FILES):
        config = AutoConfig.from_pretrained(path)
        attention = select_attention_implementation(model_args.attn_implementation)
        print(f"fastalign: no weights in {path}: initialising {config.model_type} from its config", file=sys.stderr)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return load_causal_lm(
        model_args.model_name_or_path, dtype=_torch_dtype(model_args.dtype),
        attn_implementation=model_args.attn_implementation, revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )  # fmt: skip


def _peft_config(model_args: ModelConfig, task_type: str):
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise SystemExit("--use_peft needs peft: pip install 'fastalign[peft]'") from None
    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules, task_type=task_type,
    )  # fmt: skip


def _datasets(script: ScriptArguments, config: Any):
    from fastalign.data import load_training_dataset

    if script.dataset_name is None:
        raise SystemExit("--dataset_name is required (a local JSON/JSONL/Parquet file or folder, or a hub name)")
    options = {"name": script.dataset_config} if script.dataset_config else {}
    train = load_training_dataset(script.dataset_name, split=script.dataset_train_split, **options)
    evaluate = config.eval_strategy != "no"
    return train, (load_training_dataset(script.dataset_name, split=script.dataset_test_split, **options)
                   if evaluate else None)  # fmt: skip


def _train(trainer, config: Any) -> None:
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    print(f"fastalign: model saved to {config.output_dir}", file=sys.stderr)


def run_sft(script: ScriptArguments, model_args: ModelConfig, config: SFTConfig, from_scratch_ok: bool = False):
    from fastalign.trainers import SFTTrainer

    train, evaluate = _datasets(script, config)
    trainer = SFTTrainer(
        _load_policy(model_args, from_scratch_ok), args=config, train_dataset=train, eval_dataset=evaluate,
        processing_class=_load_tokenizer(model_args), peft_config=_peft_config(model_args, "CAUSAL_LM"),
    )  # fmt: skip
    _train(trainer, config)


def run_pretrain(script: ScriptArguments, model_args: ModelConfig, config: SFTConfig):
    run_sft(script, model_args, config, from_scratch_ok=True)


def run_reward(script: ScriptArguments, model_args: ModelConfig, config: RewardConfig):
    from fastalign.models import load_reward_model
    from fastalign.trainers import RewardTrainer

    train, evaluate = _datasets(script, config)
    tokenizer = _load_tokenizer(model_args)
    model = load_reward_model(
        model_args.model_name_or_path, dtype=_torch_dtype(model_args.dtype),
        attn_implementation=model_args.attn_implementation, revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )  # fmt: skip
    trainer = RewardTrainer(
        model, args=config, train_dataset=train, eval_dataset=evaluate, processing_class=tokenizer,
        peft_config=_peft_config(model_args, "SEQ_CLS"),
    )  # fmt: skip
    _train(trainer, config)


def run_dpo(script: ScriptArguments, model_args: ModelConfig, config: DPOConfig):
    from fastalign.trainers import DPOTrainer

    train, evaluate = _datasets(script, config)
    # No ref_model: DPOTrainer uses the LoRA base with adapters disabled (--use_peft), precomputed reference
    # log-probs (--precompute_ref_log_probs), or a frozen copy of the starting policy.
    trainer = DPOTrainer(
        _load_policy(model_args, from_scratch_ok=False), args=config, train_dataset=train, eval_dataset=evaluate,
        processing_class=_load_tokenizer(model_args), peft_config=_peft_config(model_args, "CAUSAL_LM"),
    )  # fmt: skip
    _train(trainer, config)


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        "pre-train a causal LM on `text` data with packing (from a config-only folder: from scratch)",
        SFTConfig, run_pretrain, {"packing": True, "completion_only_loss": False},
    ),
    "sft": Command("supervised fine-tuning on text, messages or prompt-completion data", SFTConfig, run_sft, {}),
    "reward": Command("a Bradley-Terry reward model on preference pairs (prompt, chosen, rejected)", RewardConfig,
                      run_reward, {}),
    "dpo": Command("direct preference optimisation (every DPO loss_type) on preference pairs", DPOConfig, run_dpo, {}),
}  # fmt: skip


def _yaml_to_argv(path: str, parser: HfArgumentParser) -> list[str]:
    """The YAML file's keys as command-line flags (placed first, so later flags override them)."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise SystemExit(f"--config: cannot read {path}: {error.strerror}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config: {path} must hold a mapping of field names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"--config: {path} has unknown fields {unknown}; see --help for the accepted ones")
    argv = []
    for key, value in values.items():
        if isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def build_parser(name: str) -> HfArgumentParser:
    command = COMMANDS[name]
    parser = HfArgumentParser(
        (ScriptArguments, ModelConfig, command.config), prog=f"fastalign {name}", description=command.summary,
        epilog="Every flag can also be a key of the YAML file given with --config; flags override the file.",
    )  # fmt: skip
    parser.add_argument("--config", help="a YAML file of field: value (same names as the flags)")
    parser.set_defaults(**command.defaults)
    return parser


def parse(name: str, argv: Sequence[str]) -> tuple[ScriptArguments, ModelConfig, Any]:
    parser = build_parser(name)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    file_argv = _yaml_to_argv(known.config, parser) if known.config else []
    script, model_args, config, _ = parser.parse_args_into_dataclasses(args=[*file_argv, *argv])
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required")
    return script, model_args, config


def _top_level_help() -> str:
    lines = ["usage: fastalign COMMAND [--config FILE.yaml] [--FIELD VALUE ...]", "", "commands:"]
    lines += [f"  {name:10s} {command.summary}" for name, command in COMMANDS.items()]
    lines += [
        "",
        "`fastalign COMMAND --help` lists the command's fields (TRL's names: --model_name_or_path, --dataset_name,",
        "--output_dir, --max_steps, --learning_rate, --per_device_train_batch_size, ...).",
        "",
        "example:",
        "  fastalign sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name data.jsonl --output_dir out",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise SystemExit(f"fastalign: unknown command {name!r}\n\n{_top_level_help()}")
    script, model_args, config = parse(name, rest)
    COMMANDS[name].run(script, model_args, config)
