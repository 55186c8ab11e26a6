"""Rollout engines for online RL (GRPO): sample completions for token-id prompts and report their log-probs.

* :class:`HFGenerateEngine` — ``model.generate`` on the training model itself (no weight sync needed);
* :class:`VLLMEngine` — a colocated vLLM engine (optional dependency, imported when constructed);
* :func:`truncated_importance_weights` — the token-level truncated IS correction for the sampler/trainer mismatch.

Every engine satisfies :class:`RolloutEngine` and returns a :class:`RolloutBatch`.
"""

from fastalign.rollout._types import RolloutBatch, RolloutEngine, SamplingParams
from fastalign.rollout.hf_engine import HFGenerateEngine
from fastalign.rollout.importance import truncated_importance_weights
from fastalign.rollout.vllm_engine import VLLMEngine

__all__ = [
    "HFGenerateEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingParams",
    "VLLMEngine",
    "truncated_importance_weights",
]
