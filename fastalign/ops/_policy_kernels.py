"""Host side of the policy-loss kernels, shared by the Triton and the CUDA backends: the autograd, and the
reduction of the kernels' per-row sums over B into the loss and the metrics.

Both backends' kernels write the same per-row sums ``stats[8, B]`` (forward) and the same gradients from each
row's weight in the aggregation (backward); they differ only in how they are launched, which a :class:`Launch`
(:class:`TritonLaunch`, :class:`CudaLaunch`) says. No checks here: :func:`fastalign.ops.policy.policy_loss`
validates the arguments and picks the backend; the stats layout and the reductions are
:mod:`fastalign.ops._policy_math`'s.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Protocol

import torch

from fastalign.ops import _cuda_ext
from fastalign.ops._masks import kernel_mask
from fastalign.ops._policy_math import (
    COUNT,
    LOG_RATIO_LIMIT,
    LOSS,
    STAT_ROWS,
    PolicyArgs,
    args_row_weights,
    policy_metrics,
    policy_weights,
)

# The kernels' code of each KL estimator, and of each objective (vespo: ``−A·logp`` times its weight φ, which the
# host computes and passes as the importance weight).
_KL_KIND = {"k1": 1, "k2": 2, "k3": 3}
OBJECTIVE_CODES = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3}

Tensors = dict[str, torch.Tensor | None]


class Launch(Protocol):
    """One backend's kernels. ``tensors`` is what :meth:`prepare` returned; absent inputs are ``None``."""

    def prepare(self, a: PolicyArgs) -> Tensors:
        """The kernels' inputs: ``logps``, ``old_logps``, ``ref_logps``, ``entropy``, ``mask`` as contiguous
        ``[B, T]``; ``advantages``, ``is_weights`` as ``[B, 1]`` or ``[B, T]``. ``logps`` and ``entropy`` carry
        autograd back to the caller's tensors."""

    def forward(self, a: PolicyArgs, tensors: Tensors, stats: torch.Tensor) -> None:
        """Write each row's sums over its kept tokens into ``stats`` (float32 ``[STAT_ROWS, B]``, zeroed)."""

    def backward(self, a: PolicyArgs, tensors: Tensors, weights: torch.Tensor, grads: Tensors) -> None:
        """Write every element of ``grads["logps"]`` (``[B, T]``, logps' dtype) and of ``grads["entropy"]``
        (entropy's dtype, ``None`` without entropy) as ``weights[b]`` (float32 ``[B]``) × d(row b's loss sum) /
        d input, 0 off the mask."""


def contiguous_inputs(a: PolicyArgs) -> Tensors:
    """The kernels' inputs as :meth:`Launch.prepare` describes them, in the caller's dtypes."""

    return {
        "logps": a.logps.contiguous(),
        "old_logps": a.old_logps.detach().contiguous(),
        "ref_logps": None if a.ref_logps is None else a.ref_logps.detach().contiguous(),
        "entropy": None if a.entropy is None else a.entropy.contiguous(),
        "mask": a.mask.contiguous(),
        "advantages": a.advantages.detach(),
        # The policy term's weight: the importance weights, VESPO's φ(w) in their place, the off-policy and
        # top-entropy masks.
        "is_weights": policy_weights(a),
    }


def kernel_scalars(a: PolicyArgs) -> tuple[float, float, float]:
    """``(clip_low, clip_high, delta)`` as the kernels read them: the clip range for the clipped surrogate, else
    the bounds its clip metrics count against (cispo's ``clip_high`` is also its cap); ``delta`` is +inf when off."""
    o = a.options
    clip_low, clip_high = o.metric_clip_bounds
    return float(clip_low), float(clip_high), math.inf if o.delta is None else float(o.delta)


def _row_and_token_strides(tensor: torch.Tensor) -> tuple[int, int]:
    """``[B, 1]`` per-sequence values broadcast over tokens with a token stride of 0."""
    return tensor.stride(0), (0 if tensor.shape[1] == 1 else tensor.stride(1))


def kernel_options(module: ModuleType, a: PolicyArgs) -> object:
    """``module.PolicyOptions`` of the arguments; ``module`` is ``fastalign._C`` or ``fastalign._host_math``."""
    o = a.options
    clip_low, clip_high, delta = kernel_scalars(a)
    return module.PolicyOptions(
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=None if o.dual_clip is None else float(o.dual_clip),
        kl_coef=float(o.kl_coef),
        kl_kind=_KL_KIND[o.kl_kind],
        entropy_coef=float(o.entropy_coef),
        log_ratio_limit=LOG_RATIO_LIMIT,
        sequence_level=o.sequence_level,
        delta=delta,
        sapo_temperature_pos=float(o.sapo_temperature_pos),
        sapo_temperature_neg=float(o.sapo_temperature_neg),
        objective=OBJECTIVE_CODES[o.objective],
        bias_correction_kl=o.use_bias_correction_kl,
    )


class TritonLaunch:
    """``fastalign/kernels/triton/policy_loss.py``: any float dtypes, converted on load; masks of the dtypes in
    :data:`fastalign.ops._masks.TRITON_MASK_DTYPES` as they are, any other as torch's ``mask != 0``."""

    def prepare(self, a: PolicyArgs) -> Tensors:
        tensors = contiguous_inputs(a)
        tensors["mask"] = kernel_mask(a.mask, "triton")  # torch's own != 0 where the kernels cannot read it
        return tensors

    @staticmethod
    def _scalars(a: PolicyArgs, tensors: Tensors) -> tuple[list, dict]:
        from fastalign.kernels.triton.softmax_tile import autotune_bucket

        o = a.options
        rows, width = tensors["logps"].shape
        advantages, weights = tensors["advantages"], tensors["is_weights"]
        sizes = [rows, width, autotune_bucket(width), width]
        strides = [
            *_row_and_token_strides(advantages),
            *(_row_and_token_strides(weights) if weights is not None else (0, 0)),
        ]
        # Floats always (an int would compile another kernel variant).
        dual_clip = 0.0 if o.dual_clip is None else float(o.dual_clip)
        clip_low, clip_high, delta = kernel_scalars(a)
        sapo = [float(o.sapo_temperature_pos), float(o.sapo_temperature_neg)]
        scalars = [
            clip_low,
            clip_high,
            dual_clip,
            delta,
            *sapo,
            float(o.kl_coef),
            float(o.entropy_coef),
            LOG_RATIO_LIMIT,
        ]
        flags = {
            "SEQUENCE": o.sequence_level,
            "HAS_REF": tensors["ref_logps"] is not None,
            "HAS_ENTROPY": tensors["entropy"] is not None,
            "HAS_IS": weights is not None,
            "DUAL": o.dual_clip is not None,
            "KL_KIND": _KL_KIND[o.kl_kind],
            "OBJECTIVE": OBJECTIVE_CODES[o.objective],
            "BIAS_KL": o.use_bias_correction_kl and tensors["ref_logps"] is not None,
        }
        positional = [*sizes, *strides, *scalars]
        return positional, flags

    @staticmethod
    def _pointers(tensors: Tensors, *names: str) -> list[torch.Tensor]:
        # Absent optional inputs are passed as logps, never read (their flags are off).
        return [tensors["logps"] if tensors[name] is None else tensors[name] for name in names]

    def forward(self, a: PolicyArgs, tensors: Tensors, stats: torch.Tensor) -> None:
        from fastalign.kernels.triton import policy_loss as kernels

        positional, flags = self._scalars(a, tensors)
        names = ("logps", "old_logps", "ref_logps", "entropy", "advantages", "mask", "is_weights")
        inputs = self._pointers(tensors, *names)
        kernels.policy_loss_fwd_kernel[(stats.shape[1],)](*inputs, stats, *positional, **flags)

    def backward(self, a: PolicyArgs, tensors: Tensors, weights: torch.Tensor, grads: Tensors) -> None:
        from fastalign.kernels.triton import policy_loss as kernels

        positional, flags = self._scalars(a, tensors)
        inputs = self._pointers(tensors, "logps", "old_logps", "ref_logps", "advantages", "mask", "is_weights")
        grad_logps, grad_entropy = grads["logps"], grads["entropy"]
        kernels.policy_loss_bwd_kernel[(weights.shape[0],)](
            *inputs, weights, grad_logps, grad_logps if grad_entropy is None else grad_entropy, *positional, **flags
        )


class CudaLaunch:
    """``csrc/cuda/policy_loss.cu`` through ``fastalign._C``: inputs in float32, float16 or bfloat16 (each its
    own), masks of any dtype, on the CUDA device of ``logps`` and torch's current stream there."""

    def prepare(self, a: PolicyArgs) -> Tensors:
        tensors = contiguous_inputs(a)
        # The kernels read float32 / float16 / bfloat16; float64 inputs go in as float32, the rounding the Triton
        # kernels apply on load. (The mask keeps its dtype: a float64 1e-300 must stay nonzero.)
        for name in ("old_logps", "ref_logps", "entropy", "advantages", "is_weights"):
            tensor = tensors[name]
            if tensor is not None and tensor.dtype not in _cuda_ext.DTYPE_CODES:
                tensors[name] = tensor.to(torch.float32)
        tensors["mask"] = kernel_mask(tensors["mask"], "cuda")
        return tensors

    @staticmethod
    def _problem(ext: ModuleType, a: PolicyArgs, tensors: Tensors) -> object:
        def dense(name: str) -> tuple[int, int]:
            tensor = tensors[name]
            return (0, 0) if tensor is None else (tensor.data_ptr(), _cuda_ext.dtype_code(tensor.dtype))

        def per_row_or_token(name: str) -> tuple[int, int, int, int]:
            tensor = tensors[name]
            return (0, 0, 0, 0) if tensor is None else (*dense(name), *_row_and_token_strides(tensor))

        mask = tensors["mask"]
        rows, tokens = tensors["logps"].shape
        # The extension's field names are singular (logp, old_logp, ref_logp).
        return ext.PolicyProblem(
            rows=rows,
            tokens=tokens,
            logp=dense("logps"),
            old_logp=dense("old_logps"),
            ref_logp=dense("ref_logps"),
            entropy=dense("entropy"),
            advantages=per_row_or_token("advantages"),
            is_weights=per_row_or_token("is_weights"),
            mask=(mask.data_ptr(), mask.element_size(), mask.is_floating_point()),
            options=kernel_options(ext, a),
        )

    def forward(self, a: PolicyArgs, tensors: Tensors, stats: torch.Tensor) -> None:
        ext = _cuda_ext.extension()
        with _cuda_ext.launch_stream(tensors["logps"]) as stream:
            ext.policy_loss_forward(self._problem(ext, a, tensors), stats.data_ptr(), stream)

    def backward(self, a: PolicyArgs, tensors: Tensors, weights: torch.Tensor, grads: Tensors) -> None:
        ext = _cuda_ext.extension()
        with _cuda_ext.launch_stream(tensors["logps"]) as stream:
            problem = self._problem(ext, a, tensors)
            grad_logps, grad_entropy = grads["logps"].data_ptr(), _cuda_ext.ptr(grads["entropy"])
            ext.policy_loss_backward(problem, weights.data_ptr(), grad_logps, grad_entropy, stream)


# The launch of each kernel backend, by the name resolve_backend gives.
LAUNCHES: dict[str, Launch] = {"triton": TritonLaunch(), "cuda": CudaLaunch()}


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, entropy, a: PolicyArgs, tensors: Tensors, launch: Launch):
        rows, width = logps.shape
        stats = torch.zeros(STAT_ROWS, rows, dtype=torch.float32, device=logps.device)
        if rows > 0 and width > 0:
            launch.forward(a, tensors, stats)
        weights = args_row_weights(a, stats[COUNT])
        loss = (stats[LOSS] * weights).sum()
        ctx.a, ctx.tensors, ctx.launch = a, tensors, launch
        ctx.save_for_backward(weights)
        ctx.mark_non_differentiable(stats)
        return loss.to(logps.dtype), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (weights,) = ctx.saved_tensors
        logps, entropy = ctx.tensors["logps"], ctx.tensors["entropy"]
        launching = logps.shape[0] > 0 and logps.shape[1] > 0
        # The kernels write every element of the gradients; without a launch they are empty or all zero.
        new = torch.empty_like if launching else torch.zeros_like
        grad_logps = new(logps, memory_format=torch.contiguous_format)
        grad_entropy = None if entropy is None else new(entropy, memory_format=torch.contiguous_format)
        if launching:
            row_grad = (weights * grad_loss).to(torch.float32).contiguous()
            ctx.launch.backward(ctx.a, ctx.tensors, row_grad, {"logps": grad_logps, "entropy": grad_entropy})
        return grad_logps, grad_entropy, None, None, None


def policy_loss_kernels(a: PolicyArgs, launch: Launch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fastalign.policy_loss` through one backend's kernels: ``(loss, metrics)`` as the torch path returns
    them, the loss in logps' dtype and the metrics float32 scalars (no host sync), reduced from the kernels'
    per-row sums."""
    tensors = launch.prepare(a)
    loss, stats = _PolicyLoss.apply(tensors["logps"], tensors["entropy"], a, tensors, launch)
    return loss, policy_metrics(a, stats)
