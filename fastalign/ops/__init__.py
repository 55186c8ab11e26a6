"""The differentiable public ops: argument checks, autograd, backend dispatch. Imports nothing above it."""

from fastalign.ops.cross_entropy import linear_cross_entropy
from fastalign.ops.dispatch import BackendStatus, BackendUnavailableError, backends, set_scratch_budget
from fastalign.ops.logprobs import linear_logprobs, logprobs_from_logits

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "backends",
    "linear_cross_entropy",
    "linear_logprobs",
    "logprobs_from_logits",
    "set_scratch_budget",
]
