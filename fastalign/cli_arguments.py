"""The dataclasses of the ``fastalign`` commands' own flags (besides the trainers' configs and ``ModelConfig``).

Imported only when a command's parser is built (it pulls in transformers through the configs); the snapshot in
:mod:`fastalign.cli_spec` answers ``--help`` without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastalign.trainers.configs import ScriptArguments


@dataclass
class RewardArguments:
    """The reward flags of ``fastalign grpo``, ``ppo`` and ``rejection-sample`` (TRL's GRPO script names)."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: accuracy_reward, think_format_reward, code_reward, soft_overlong_punishment "
            "(needs --soft_punish_cache), or a function of your own as module.path:function (or module.path.function; "
            "the current folder is importable). Weighted by --reward_weights, after the reward model if any."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A reward model (num_labels=1, e.g. from `fastalign reward`): a local folder or a hub name; "
            "it is the first reward function."
        },
    )
    soft_punish_cache: int | None = field(
        default=None,
        metadata={
            "help": "DAPO's L_cache for soft_overlong_punishment: the last this many tokens before "
            "max_completion_length are punished linearly (L_max is max_completion_length)."
        },
    )


@dataclass
class GRPOScriptArguments(RewardArguments, ScriptArguments):
    """``fastalign grpo``'s script arguments: the dataset and the reward functions (TRL's ``GRPOScriptArguments``)."""


@dataclass
class RejectionSamplingArguments(RewardArguments):
    """``fastalign rejection-sample``: sample k completions per prompt, keep the best ones, write an SFT dataset."""

    output_path: str | None = field(
        default=None, metadata={"help": "The JSONL file to write (prompt, completion, the other columns, reward)."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (reward model first); default 1 each."}
    )
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (k)."})
    max_completion_length: int = field(default=512, metadata={"help": "Tokens generated per completion at most."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompts keep their last this many tokens when sampling (None: all)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation call (each gives k completions)."})
    keep: str = field(
        default="best",
        metadata={
            "help": "'best': each prompt's highest-reward completion (if >= --threshold, when given); 'threshold': "
            "every completion with reward >= --threshold.",
            "choices": ["best", "threshold"],
        },
    )
    threshold: float | None = field(default=None, metadata={"help": "The lowest reward a kept completion may have."})
    skip_truncated: bool = field(
        default=False, metadata={"help": "Never keep completions cut at max_completion_length (no EOS)."}
    )
    deduplicate: bool = field(
        default=True, metadata={"help": "With --keep threshold, keep identical completions of a prompt once."}
    )
    mix_dataset: str | None = field(
        default=None,
        metadata={"help": "SFT data to mix in (prompt + completion, or messages for conversational data)."},
    )
    mix_dataset_split: str = field(default="train", metadata={"help": "The mix dataset's split."})
    mix_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of the output rows drawn from --mix_dataset, in [0, 1)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the sampling and of the mix."})
    device: str | None = field(default=None, metadata={"help": "Where the models run (default: cuda if available)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self):
        from fastalign.sampling import _check_keep

        _check_keep(self.keep, self.threshold)
        if not 0 <= self.mix_ratio < 1:
            raise ValueError(
                f"mix_ratio is the fraction of output rows from --mix_dataset, in [0, 1): got {self.mix_ratio}"
            )
        if (self.mix_dataset is None) != (self.mix_ratio == 0):
            raise ValueError("--mix_dataset and --mix_ratio go together: give both (a ratio > 0) or neither")
