"""Rollout engines for online RL (GRPO): sample completions for token-id prompts and report their log-probs.

* :class:`HFGenerateEngine` — ``model.generate`` on the training model itself (no weight sync needed);
* :class:`VLLMEngine` — a colocated vLLM engine (optional dependency, imported when constructed);
* :func:`sampler_importance_weights` — the IS correction for the sampler/trainer mismatch, per token or per sequence,
  truncated or masked (TRL's four ``vllm_importance_sampling_mode`` values); :func:`truncated_importance_weights`
  is its token-level truncated case.

Every engine satisfies :class:`RolloutEngine` and returns a :class:`RolloutBatch`.
"""

from fastalign.rollout._types import RolloutBatch, RolloutEngine, SamplingParams
from fastalign.rollout.hf_engine import HFGenerateEngine
from fastalign.rollout.importance import (
    IMPORTANCE_SAMPLING_MODES,
    check_importance_sampling_options,
    sampler_importance_weights,
    truncated_importance_weights,
)
from fastalign.rollout.vllm_engine import VLLMEngine

__all__ = [
    "IMPORTANCE_SAMPLING_MODES",
    "HFGenerateEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingParams",
    "VLLMEngine",
    "check_importance_sampling_options",
    "sampler_importance_weights",
    "truncated_importance_weights",
]
