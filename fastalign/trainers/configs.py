"""Configurations of the trainers and their scripts, with TRL 1.x's field names and defaults.

A user coming from TRL passes the same YAML keys and command-line flags. The trainer configs extend
``transformers.TrainingArguments`` (output_dir, learning_rate, per_device_train_batch_size, max_steps, ...);
fields that only fastalign has are marked as such in their help text.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from transformers import TrainingArguments

from fastalign.ops._checks import check_number
from fastalign.ops._dpo_math import DPOLossOptions
from fastalign.ops._policy_math import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, PolicyLossOptions
from fastalign.ops.advantages import GROUP_SCALES
from fastalign.rollout.importance import check_importance_sampling_options


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


BACKENDS = ("auto", "torch", "triton", "cuda")


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

    # Fields (mostly ``TrainingArguments``') this trainer does not honour: name -> why. Set to anything but this
    # config's default, the config refuses them (see :meth:`_refuse_unhonoured_fields`).
    _UNHONOURED_FIELDS: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        _check_training_numbers(self)
        if self.bf16 is None:
            # TRL turns bf16 on whenever fp16 is off; on a machine without a bf16 GPU transformers then refuses to
            # start (unless use_cpu), so the default also asks for the hardware.
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()
        self._refuse_unhonoured_fields()  # after TrainingArguments normalised them (False -> "no", ...)

    def _refuse_unhonoured_fields(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        defaults["include_num_input_tokens_seen"] = "no"  # what TrainingArguments turns False into
        for name, why in self._UNHONOURED_FIELDS.items():
            value, default = getattr(self, name), defaults[name]
            if value != default:
                raise ValueError(
                    f"{name}={value!r}: {type(self).__name__[: -len('Config')]}Trainer does not honour it ({why}); "
                    f"leave it at {default!r}"
                )


def _check_training_numbers(args: TrainingArguments) -> None:
    """Refuse, before any model is loaded, the optimisation numbers ``TrainingArguments`` lets through."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_number(name, getattr(args, name), integer=True, at_least=1)
    if args.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {args.backend!r}")
    check_number("learning_rate", args.learning_rate, at_least=0)


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

    def __post_init__(self):
        why = "the fused cross-entropy's label smoothing"
        check_number(
            "label_smoothing_factor", self.label_smoothing_factor, at_least=0, at_most=1, finite=False, why=why
        )
        super().__post_init__()


# TrainingArguments fields that only a cross-entropy on labels reads: the preference and RL losses are their own.
_NO_LABEL_SMOOTHING = {
    "label_smoothing_factor": "it smooths a cross-entropy on labels, which this trainer's loss is not",
}
# ... and what the online trainers' own sampler and generation loop leave unread.
_ONLINE_UNHONOURED = {
    **_NO_LABEL_SMOOTHING,
    "train_sampling_strategy": "prompts are drawn by the trainer's own group sampler",
    "dataloader_num_workers": "the trainer's own prompt loader runs in the training process",
    "dataloader_persistent_workers": "the trainer's own prompt loader runs in the training process",
    "dataloader_prefetch_factor": "the trainer's own prompt loader runs in the training process",
    "include_num_input_tokens_seen": "the inputs are generated; the trainer logs num_tokens itself",
    "auto_find_batch_size": "the generation batch is fixed when the config is built",
    "neftune_noise_alpha": "noise in the embeddings would differ between the old and the new log-probs",
    "remove_unused_columns": "every dataset column reaches the reward functions",
}


@dataclass
class RewardConfig(FastalignTrainingConfig):
    """Bradley-Terry reward modelling on preference pairs (TRL's ``RewardConfig``)."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenising the dataset."})
    eos_token: str | None = field(default=None, metadata={"help": "End-of-sequence token (default: tokenizer's)."})
    pad_token: str | None = field(
        default=None, metadata={"help": "Padding token (default: the tokenizer's, else its EOS token)."}
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Pairs whose chosen or rejected sequence is longer are dropped (as TRL); None keeps all."},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad every batch's length up to a multiple of this."}
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Weight of mean((r_chosen + r_rejected)^2), keeping rewards centred (0.01 recommended)."},
    )

    _UNHONOURED_FIELDS: ClassVar[dict[str, str]] = {
        **_NO_LABEL_SMOOTHING,
        "backend": "the reward model's loss is a small op on its scores, with one implementation",
    }

    def __post_init__(self):
        why = "a negative one pushes the rewards away from 0"
        check_number("center_rewards_coefficient", self.center_rewards_coefficient, at_least=0, optional=True, why=why)
        super().__post_init__()


# TRL 1.x DPO loss types fastalign does not implement, with what to use instead.
_UNSUPPORTED_DPO_LOSSES = {
    "aot": "AOT sorts the batch's log-ratios; fastalign has no fused version of it",
    "aot_unpaired": "AOT sorts the batch's log-ratios; fastalign has no fused version of it",
}


@dataclass
class DPOConfig(FastalignTrainingConfig):
    """Direct preference optimisation (TRL's ``DPOConfig``: same field names and defaults).

    TRL options that fastalign does not implement are accepted at their defaults and refused, when this config
    is built, at any other value: ``ld_alpha``, ``f_divergence_type`` other than ``"reverse_kl"``,
    ``use_weighting``, ``sync_ref_model``, ``activation_offloading``, ``router_aux_loss_coef`` (other than None or
    0), ``truncation_mode="keep_end"`` and the ``aot`` / ``aot_unpaired`` loss types.
    """

    _VALID_DICT_FIELDS = (*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs")  # JSON strings from the CLI

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    # Parameters that control the model
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained when the model is given as a name or path."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "MoE load-balancing loss coefficient; not implemented by fastalign (None or 0 only)."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout in the model and the reference model."}
    )
    # Parameters that control the data preprocessing
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenising the dataset."})
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Tokens per prompt + completion sequence; longer ones keep their first max_length tokens "
            "(pairs whose prompt alone fills max_length are dropped). None: no truncation."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Only 'keep_start' (TRL's only supported value).", "choices": ["keep_end", "keep_start"]},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Unavailable in TRL 1.x's DPO as in fastalign: True warns and pads (as TRL)."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad sequences to a multiple of this; 'auto': no padding multiple."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs once over the dataset before training (no ref model kept)."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of that pass; default: per_device_train/eval_batch_size."},
    )
    # Parameters that control the training
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "Loss type(s): 'sigmoid', 'hinge', 'ipo', 'exo_pair', 'nca_pair', 'robust', 'bco_pair', "
            "'sppo_hard', 'apo_zero', 'apo_down', 'discopop', 'sft', 'sigmoid_norm'; several are summed with "
            "loss_weights."
        },
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss type (default: 1.0 each)."}
    )
    ld_alpha: float | None = field(default=None, metadata={"help": "LD-DPO alpha; not implemented (None only)."})
    f_divergence_type: str = field(
        default="reverse_kl", metadata={"help": "f-DPO divergence; fastalign implements 'reverse_kl' only."}
    )
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "alpha of the alpha-divergence (unused: only reverse_kl is implemented)."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Label smoothing: flip probability of 'robust' in [0, 0.5), EXO's epsilon in (0, 1), and "
            "(fastalign, as TRL < 1.0) conservative DPO for 'sigmoid' in [0, 0.5]."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "Deviation from the reference model (IPO's tau)."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO weighting; not implemented (False only)."})
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP's tau."})
    activation_offloading: bool = field(
        default=False, metadata={"help": "Offload activations to the CPU; not implemented (False only)."}
    )
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO reference syncing; not implemented (False only)."}
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO alpha (needs sync_ref_model)."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO tau (needs sync_ref_model)."})
    pad_token: str | None = field(default=None, metadata={"help": "Padding token (default: tokenizer's, else EOS)."})

    _UNHONOURED_FIELDS: ClassVar[dict[str, str]] = {
        "label_smoothing_factor": "DPO's own label smoothing is the label_smoothing field",
        "f_alpha_divergence_coef": "only f_divergence_type='reverse_kl' is implemented",
        "ref_model_mixup_alpha": "TR-DPO reference syncing (sync_ref_model) is not implemented",
        "ref_model_sync_steps": "TR-DPO reference syncing (sync_ref_model) is not implemented",
    }

    def dpo_loss_options(self) -> DPOLossOptions | None:
        """The options of the DPO loss types (every type but ``sft``, which is the chosen rows' NLL), or ``None``
        when ``sft`` is the only type."""
        weights = self.loss_weights or [1.0] * len(self.loss_type)
        types = [name for name in self.loss_type if name != "sft"]
        if not types:
            return None
        dpo_weights = [w for name, w in zip(self.loss_type, weights, strict=True) if name != "sft"]
        return DPOLossOptions(self.beta, types, self.label_smoothing, self.discopop_tau, dpo_weights)

    @property
    def sft_weight(self) -> float | None:
        """The summed weight of the ``sft`` loss type, ``None`` without it."""
        if "sft" not in self.loss_type:
            return None
        weights = self.loss_weights or [1.0] * len(self.loss_type)
        return sum(w for name, w in zip(self.loss_type, weights, strict=True) if name == "sft")

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in self.loss_weights]
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(
                    f"loss_weights must have one weight per loss type: got {len(self.loss_weights)} weights for "
                    f"{len(self.loss_type)} loss types {self.loss_type}"
                )
        for name in self.loss_type:
            if name in _UNSUPPORTED_DPO_LOSSES:
                raise ValueError(f"loss_type {name!r} is not implemented by fastalign: {_UNSUPPORTED_DPO_LOSSES[name]}")
        unsupported = {
            "ld_alpha": (self.ld_alpha is not None, "LD-DPO length desensitisation"),
            "f_divergence_type": (self.f_divergence_type != "reverse_kl", "f-DPO divergences other than reverse_kl"),
            "use_weighting": (self.use_weighting, "WPO weighting"),
            "sync_ref_model": (self.sync_ref_model, "TR-DPO reference syncing"),
            "activation_offloading": (self.activation_offloading, "activation offloading"),
            "router_aux_loss_coef": (bool(self.router_aux_loss_coef), "the MoE load-balancing loss"),
            "truncation_mode": (self.truncation_mode != "keep_start", "truncation_mode='keep_end' (deprecated in TRL)"),
        }
        for name, (is_set, what) in unsupported.items():
            if is_set:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: fastalign's DPOTrainer does not implement {what}; leave "
                    f"{name} at its default"
                )
        if not self.loss_type:
            raise ValueError("loss_type must name at least one loss")
        # Building the DPO types' options checks their names, beta, discopop_tau and label_smoothing per type.
        if self.dpo_loss_options() is None and self.label_smoothing != 0:  # sft alone
            raise ValueError(f"label_smoothing={self.label_smoothing} would be ignored by loss_type {self.loss_type}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1 or None, got {self.max_length}")
        super().__post_init__()
        if isinstance(self.pad_to_multiple_of, str):  # the CLI passes it as a string
            value = self.pad_to_multiple_of.lower()
            self.pad_to_multiple_of = None if value in ("auto", "none", "null") else int(value)


@dataclass
class GRPOConfig(FastalignTrainingConfig):
    """Group Relative Policy Optimization (TRL's ``GRPOConfig``; DAPO's dynamic sampling is fastalign's own).

    ``per_device_train_batch_size`` counts completions, as in TRL: one optimiser step of
    ``per_device_train_batch_size × gradient_accumulation_steps`` completions is
    ``… / num_generations`` prompts.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: reward functions read them (e.g. solution)."}
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability to 0."})
    # generation
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the group size)."})
    max_completion_length: int = field(default=512, metadata={"help": "Tokens generated per completion at most."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "fastalign: prompts keep their last this many tokens (None: all)."}
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Completions generated at once (default: per_device_train_batch_size × steps_per_generation)."
        },
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches each generation feeds (default: gradient_accumulation_steps)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also used for the log-probs)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling threshold."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty while sampling."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (pip install 'fastalign[vllm]')."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM's share of GPU memory."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallelism."})
    vllm_importance_sampling_correction: bool = field(
        default=True, metadata={"help": "Importance weights for the sampler/trainer log-prob mismatch (use_vllm)."}
    )
    vllm_importance_sampling_mode: str = field(
        default="sequence_mask",
        metadata={
            "help": "'token_truncate', 'token_mask', 'sequence_truncate' or 'sequence_mask': per token or per "
            "sequence (product of the token ratios), clamped into [clip_min, clip_max] or zeroed outside it."
        },
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=3.0, metadata={"help": "Upper bound of those weights (None: none)."}
    )
    vllm_importance_sampling_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound of those weights (None: none)."}
    )
    vllm_importance_sampling_cap: float | None = field(
        default=None, metadata={"help": "Deprecated (TRL 1.6): vllm_importance_sampling_clip_max."}
    )
    # loss
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (k3 to the reference); 0 loads no reference."})
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes over each generation (μ)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip: ratio >= 1 - epsilon."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clip (default: epsilon; DAPO 0.28)."})
    importance_sampling_level: str = field(default="token", metadata={"help": "'token' or 'sequence' (GSPO)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the reward functions."})
    scale_rewards: str = field(default="group", metadata={"help": "'group', 'batch' or 'none' (Dr. GRPO)."})
    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo' (ratio capped at epsilon_high, detached, times the "
            "log-prob), 'sapo' (soft gate), 'luspo' (length-scaled GSPO) or 'vespo' (gamma-weighted)."
        },
    )
    delta: float | None = field(
        default=None, metadata={"help": "INTELLECT-2's two-sided clip: cap of the unclipped ratio (> 1 + epsilon)."}
    )
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO's temperature where A > 0."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO's temperature where A <= 0."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "VESPO's power k where A >= 0."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "VESPO's decay λ where A >= 0."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO's power k where A < 0."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO's decay λ where A < 0."})
    off_policy_mask_threshold: float | None = field(
        default=None,
        metadata={
            "help": "DeepSeek-V3.2's off-policy sequence mask: no policy loss for a sequence with A < 0 whose mean "
            "log-ratio sampler / policy exceeds this (e.g. 0.5); None: off."
        },
    )
    top_entropy_quantile: float = field(
        default=1.0,
        metadata={"help": "Keep the policy loss of the top ρ of tokens by entropy only (0.2 in the paper; 1: all)."},
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "DeepSeek-V3.2's unbiased KL: the KL term times the importance ratio (with beta != 0)."},
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Completions cut at max_completion_length carry no loss."}
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus coefficient."})
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "fastalign: DAPO's dynamic sampling: drop groups whose rewards are all equal and refill."},
    )
    max_resample_rounds: int = field(
        default=4, metadata={"help": "fastalign: refill rounds of dynamic sampling before keeping what there is."}
    )
    log_completions: bool = field(
        default=False,
        metadata={"help": "Print the last generation's prompts, completions, rewards and advantages when logging."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Rows of that sample printed (None: all of the last generation batch)."}
    )

    _UNHONOURED_FIELDS: ClassVar[dict[str, str]] = _ONLINE_UNHONOURED

    def policy_loss_options(self) -> PolicyLossOptions:
        """The options of the policy loss (``epsilon`` / ``epsilon_high`` are its clip range, ``beta`` the k3 KL's
        coefficient)."""
        return PolicyLossOptions(
            clip_eps_low=self.epsilon,
            clip_eps_high=self.epsilon_high,
            kl_coef=self.beta,
            kl_estimator="k3",
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            entropy_coef=self.entropy_coef,
            max_completion_length=self.max_completion_length,
            delta=self.delta,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            top_entropy_quantile=self.top_entropy_quantile,
            use_bias_correction_kl=self.use_bias_correction_kl,
        )

    def __post_init__(self):
        super().__post_init__()
        for name in ("beta", "epsilon", "entropy_coef"):
            check_number(name, getattr(self, name), at_least=0)
        if self.num_completions_to_print is not None and self.num_completions_to_print < 1:
            raise ValueError(f"num_completions_to_print must be None or >= 1, got {self.num_completions_to_print}")
        check_number("epsilon_high", self.epsilon_high, at_least=0, finite=False, optional=True)
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.generation_batch_size is None:
            self.generation_batch_size = self.per_device_train_batch_size * self.steps_per_generation
        elif self.generation_batch_size != self.per_device_train_batch_size * self.steps_per_generation:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must equal per_device_train_batch_size × "
                f"steps_per_generation ({self.per_device_train_batch_size} × {self.steps_per_generation})"
            )
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"the generation batch ({self.generation_batch_size} completions) must be a multiple of "
                f"num_generations ({self.num_generations}): whole groups only"
            )
        if self.vllm_importance_sampling_cap is not None:
            warnings.warn(
                "vllm_importance_sampling_cap is deprecated: use vllm_importance_sampling_clip_max (it is set "
                "from the cap)",
                FutureWarning,
                stacklevel=3,
            )
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        if self.vllm_importance_sampling_correction:
            try:
                check_importance_sampling_options(
                    self.vllm_importance_sampling_mode,
                    self.vllm_importance_sampling_clip_min,
                    self.vllm_importance_sampling_clip_max,
                )
            except ValueError as error:
                raise ValueError(f"vllm_importance_sampling_{error}") from None
            if (
                self.use_vllm
                and self.loss_type == "vespo"
                and not self.vllm_importance_sampling_mode.startswith("token")
            ):
                raise ValueError(
                    "loss_type='vespo' folds the per-token importance weights into its sequence weight: "
                    "vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask', got "
                    f"{self.vllm_importance_sampling_mode!r}"
                )
        choices = {
            "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS,
            "scale_rewards": GROUP_SCALES,
            "loss_type": tuple(LOSS_TYPES),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        try:
            self.policy_loss_options()
        except ValueError as error:
            raise ValueError(f"{error} (GRPOConfig's {_GRPO_LOSS_NAMES})") from None
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.eval_strategy != "no" and self.per_device_eval_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_eval_batch_size ({self.per_device_eval_batch_size} completions) must be a multiple of "
                f"num_generations ({self.num_generations}) when evaluating: whole groups only"
            )


# How GRPOConfig's fields are named in PolicyLossOptions, for the messages of its checks.
_GRPO_LOSS_NAMES = "epsilon is clip_eps_low, epsilon_high clip_eps_high, beta kl_coef"

PPO_OBJECTIVES = ("clip", "kl_penalty")


@dataclass
class PPOConfig(FastalignTrainingConfig):
    """Proximal policy optimisation with a value model (TRL's ``PPOConfig``: same field names and defaults).

    One rollout batch is ``per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches``
    completions (TRL's ``local_batch_size``); it is trained on ``num_ppo_epochs`` times, each time shuffled and
    cut into ``num_mini_batches`` mini-batches, one optimiser step each (so a rollout feeds
    ``num_ppo_epochs × num_mini_batches`` optimiser steps). ``objective``, ``kl_in_reward``,
    ``kl_penalty_coef``, ``kl_penalty_estimator``, ``target_kl``, ``whiten_advantages``, ``num_generations``,
    ``reward_weights``, ``max_prompt_length`` and the sampling filters are fastalign's own. Completions always end
    at EOS (TRL's ``stop_token="eos"``). TRL fields not listed here (``sft_model_path``, ``num_sample_generations``,
    ``ds3_gather_for_generation``, adapter names) are not implemented.
    """

    learning_rate: float = field(default=3e-6, metadata={"help": "Initial AdamW learning rate."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: reward functions read them."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set every dropout probability of policy, value and reference models to 0."}
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Not implemented (prompts are tokenised on the fly): None only."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model used when the trainer is given no reward_funcs."}
    )
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Completions to train on in total; sets max_steps when max_steps is not given."},
    )
    # generation
    response_length: int = field(default=53, metadata={"help": "Tokens generated per completion at most."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "fastalign: prompts keep their last this many tokens (None: all)."}
    )
    num_generations: int = field(
        default=1, metadata={"help": "fastalign: completions sampled per prompt (TRL's PPO samples one)."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (also used for the log-probs)."})
    top_p: float = field(default=1.0, metadata={"help": "fastalign: nucleus sampling mass."})
    top_k: int = field(default=0, metadata={"help": "fastalign: top-k sampling (0: off)."})
    stop_token: str | None = field(
        default=None,
        metadata={"help": "None or 'eos': completions end at the EOS token (or stop_token_id) either way."},
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "Token id that ends a completion (default: the tokenizer's EOS)."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per generate call and per no-gradient forward of the rollout."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of completions that end without EOS."}
    )
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the reward functions."})
    # optimisation
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches (optimiser steps) per pass."})
    objective: str = field(
        default="clip",
        metadata={
            "help": "fastalign: 'clip' (the clipped surrogate) or 'kl_penalty' (E[ratio·A] − β·KL(π_old‖π), with "
            "the PPO paper's adaptive β)."
        },
    )
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value prediction."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards (not their mean)."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "fastalign: whiten the advantages over the rollout (TRL always does)."}
    )
    kl_coef: float = field(default=0.05, metadata={"help": "KL coefficient of the KL to the reference; 0: none."})
    kl_estimator: str = field(
        default="k1",
        metadata={
            "help": "'k1' or 'k3': estimator of the per-token KL to the reference in the reward (and in the "
            "logged objective/kl)."
        },
    )
    kl_in_reward: bool = field(
        default=True,
        metadata={
            "help": "fastalign: True (TRL): −kl_coef·KL per token in the reward; False: kl_coef·k3 KL to the "
            "reference in the policy loss (as GRPO's beta)."
        },
    )
    kl_penalty_coef: float = field(
        default=1.0, metadata={"help": "fastalign: initial β of the 'kl_penalty' objective."}
    )
    kl_penalty_estimator: str = field(
        default="k3",
        metadata={
            "help": "fastalign: 'k1' (old − logp) or 'k3' (ratio − 1 − log ratio): per-token estimate of "
            "KL(π_old‖π) in the 'kl_penalty' loss; k3 is never negative and has zero gradient at π_old."
        },
    )
    target_kl: float | None = field(
        default=0.01,
        metadata={
            "help": "fastalign: 'kl_penalty' target: after each update β doubles when KL(π_old‖π) > 1.5·target "
            "and halves when < target/1.5; None keeps β fixed."
        },
    )

    _UNHONOURED_FIELDS: ClassVar[dict[str, str]] = {
        **_ONLINE_UNHONOURED,
        "dataset_num_proc": "prompts are tokenised on the fly, in the training process",
    }

    @property
    def rollout_batch_size(self) -> int:
        """Completions per rollout (TRL's ``local_batch_size``)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    def __post_init__(self):
        super().__post_init__()
        counts = ("num_ppo_epochs", "num_mini_batches", "num_generations", "response_length")
        for name in (*counts, "local_rollout_forward_batch_size"):
            check_number(name, getattr(self, name), integer=True, at_least=1)
        if self.rollout_batch_size % self.num_generations:
            raise ValueError(
                f"the rollout batch ({self.rollout_batch_size} completions = per_device_train_batch_size × "
                f"gradient_accumulation_steps × num_mini_batches) must be a multiple of num_generations "
                f"({self.num_generations})"
            )
        if self.objective not in PPO_OBJECTIVES:
            raise ValueError(f"objective must be one of {PPO_OBJECTIVES}, got {self.objective!r}")
        for name in ("kl_estimator", "kl_penalty_estimator"):
            if getattr(self, name) not in ("k1", "k3"):
                raise ValueError(f"{name} must be 'k1' or 'k3', got {getattr(self, name)!r}")
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"stop_token must be None or 'eos', got {self.stop_token!r}")
        check_number("cliprange", self.cliprange, at_least=0, below=1)
        for name in ("vf_coef", "cliprange_value", "kl_coef", "kl_penalty_coef"):
            check_number(name, getattr(self, name), at_least=0)
        for name in ("gamma", "lam"):
            check_number(name, getattr(self, name), at_least=0, at_most=1, finite=False)
        check_number("target_kl", self.target_kl, above=0, optional=True)
        if self.total_episodes is not None and self.max_steps <= 0:
            rollouts = -(-self.total_episodes // self.rollout_batch_size)
            self.max_steps = rollouts * self.num_ppo_epochs * self.num_mini_batches


@dataclass
class DistillConfig(FastalignTrainingConfig):
    """Knowledge distillation from a frozen teacher (TRL 1.16's ``DistillationConfig``; ``lmbda`` is TRL's GKD
    name).

    Each optimiser step draws one *generation batch* of ``per_device_train_batch_size ×
    gradient_accumulation_steps`` dataset rows; with probability ``lmbda`` its completions are sampled from the
    student (on-policy, as TRL's ``DistillationTrainer`` always does), otherwise they are the dataset's
    ``completion`` column (off-policy, GKD's supervised batches). The loss is the generalized JSD of
    :func:`fastalign.linear_distill_loss` over the completion tokens, a token mean over the generation batch. TRL
    fields not listed here (``model_init_kwargs``, ``teacher_model_init_kwargs``, ``generation_kwargs``,
    ``chat_template_kwargs``, the vLLM server and tool-calling fields) are not implemented.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column (the trainer reads prompt and completion)."}
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability to 0."})
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher: a local folder or a hub model name (same tokenizer)."}
    )
    teacher_model_revision: str | None = field(
        default=None, metadata={"help": "The teacher's hub revision (branch, tag or commit)."}
    )
    lmbda: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of the generation batches whose completions the student samples (on-policy); the "
            "others train on the dataset's completion column (1: always on-policy, as TRL's DistillationTrainer)."
        },
    )
    beta: float = field(
        default=1.0,
        metadata={"help": "The divergence: 0 forward KL(teacher‖student), 0.5 JSD, 1 reverse KL(student‖teacher)."},
    )
    max_completion_length: int = field(
        default=512, metadata={"help": "Tokens per completion at most (sampled, or cut from the dataset's)."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "fastalign: prompts keep their last this many tokens (None: all)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature, also dividing both heads' logits in the loss."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (on-policy batches)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off; on-policy batches)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling threshold (on-policy batches)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty while sampling."})
    log_completions: bool = field(
        default=False, metadata={"help": "Print the last generation batch's prompts and completions when logging."}
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Rows of that sample printed (None: all of the last generation batch)."}
    )

    # What the online trainers' base reads: distillation samples one completion per prompt and has no rewards.
    num_generations: ClassVar[int] = 1
    reward_weights: ClassVar[None] = None

    _UNHONOURED_FIELDS: ClassVar[dict[str, str]] = {
        **_ONLINE_UNHONOURED,
        "remove_unused_columns": "the trainer reads the prompt and completion columns itself",
    }

    @property
    def generation_batch_size(self) -> int:
        """Rows of one generation batch: ``per_device_train_batch_size × gradient_accumulation_steps``."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def __post_init__(self):
        super().__post_init__()
        check_number("lmbda", self.lmbda, at_least=0, at_most=1)
        check_number("beta", self.beta, at_least=0, at_most=1)
        check_number("temperature", self.temperature, above=0)
        check_number("max_completion_length", self.max_completion_length, integer=True, at_least=1)
        if self.num_completions_to_print is not None and self.num_completions_to_print < 1:
            raise ValueError(f"num_completions_to_print must be None or >= 1, got {self.num_completions_to_print}")
        if self.backend == "cuda":
            raise ValueError(
                "backend='cuda': the distillation loss has torch and Triton kernels only; use 'auto', 'torch' or "
                "'triton'"
            )
