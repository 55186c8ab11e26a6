"""Configurations of the trainers and their scripts, with TRL 1.x's field names and defaults.

A user coming from TRL passes the same YAML keys and command-line flags. The trainer configs extend
``transformers.TrainingArguments`` (output_dir, learning_rate, per_device_train_batch_size, max_steps, ...);
fields that only fastalign has are marked as such in their help text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments


@dataclass
class ScriptArguments:
    """What the ``fastalign`` commands load besides the model: the dataset (TRL's ``ScriptArguments``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A local JSON/JSONL/Parquet file or folder, or a Hugging Face hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The hub dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (when eval is enabled)."})


@dataclass
class ModelConfig:
    """How the model is loaded (TRL's ``ModelConfig``, the fields fastalign uses)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "A local folder or a hub model name."})
    model_revision: str = field(default="main", metadata={"help": "The hub revision (branch, tag or commit)."})
    dtype: str | None = field(
        default=None, metadata={"help": "Weights' dtype: 'auto', 'bfloat16', 'float16' or 'float32'."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel; default: flash_attention_2 when flash-attn is importable, else sdpa."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (needs `pip install peft`)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: peft's choice for the architecture)."}
    )


@dataclass
class FastalignTrainingConfig(TrainingArguments):
    """``TrainingArguments`` with the defaults TRL's trainers share, plus fastalign's kernel backend."""

    logging_steps: float = field(default=10, metadata={"help": "Update steps between two logs."})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in the backward to save memory."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bfloat16 mixed precision; default: on when the GPU supports it and fp16 is not set."},
    )
    backend: str = field(
        default="auto",
        metadata={"help": "fastalign only: kernel backend of the fused losses ('auto', 'torch', 'triton', 'cuda')."},
    )

    def __post_init__(self):
        if self.bf16 is None:
            # TRL turns bf16 on whenever fp16 is off; on a machine without a bf16 GPU transformers then refuses to
            # start (unless use_cpu), so the default also asks for the hardware.
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()


@dataclass
class SFTConfig(FastalignTrainingConfig):
    """Supervised fine-tuning and pre-training (TRL's ``SFTConfig``)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column of language-modelling datasets."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Tokens per sequence (or per packed row); longer ones are truncated."}
    )
    packing: bool = field(default=False, metadata={"help": "Pack several examples into each max_length row."})
    padding_free: bool = field(
        default=False, metadata={"help": "One row per batch with position_ids, no padding (flash attention)."}
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss only on completions of prompt-completion data; default: on for such data."},
    )
    eos_token: str | None = field(default=None, metadata={"help": "End-of-sequence token (default: tokenizer's)."})
    pad_token: str | None = field(default=None, metadata={"help": "Padding token (default: tokenizer's)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenising the dataset."})
