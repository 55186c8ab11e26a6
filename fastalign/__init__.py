"""fastalign: fused kernels and thin trainers for aligning language models.

The public ops compute what alignment training needs straight from hidden states and the lm_head weight,
without materialising the ``[tokens, vocab]`` logits.
"""

from fastalign.ops import (
    BackendStatus,
    BackendUnavailableError,
    backends,
    linear_cross_entropy,
    linear_logprobs,
    logprobs_from_logits,
    set_scratch_budget,
)

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "__version__",
    "backends",
    "linear_cross_entropy",
    "linear_logprobs",
    "logprobs_from_logits",
    "set_scratch_budget",
]
