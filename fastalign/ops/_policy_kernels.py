"""Host side of the policy-loss kernels, shared by the Triton and the CUDA backends: the autograd, and the
reduction of the kernels' per-row sums over B into the loss and the metrics.

Both backends' kernels write the same per-row sums ``stats[8, B]`` (forward) and the same gradients from each
row's weight in the aggregation (backward); they differ only in how they are launched, which a :class:`Launch`
(:class:`TritonLaunch`, :class:`CudaLaunch`) says. No checks here: :func:`fastalign.ops.policy.policy_loss`
validates the arguments and picks the backend.
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

import torch

from fastalign.ops import _cuda_ext
from fastalign.ops._masks import kernel_mask
from fastalign.ops.policy import LOG_RATIO_LIMIT, PolicyArgs, row_weights

# Rows of the per-row sums stats[8, B]: the layout of the Triton kernels and of csrc's policy::Stat.
LOSS, COUNT, LOW_CLIP, HIGH_CLIP, DUAL_CLIP, RATIO, KL, ENTROPY = range(8)
STAT_ROWS = 8

_KL_KIND = {"k1": 1, "k2": 2, "k3": 3}

Tensors = dict[str, torch.Tensor | None]


class Launch(Protocol):
    """One backend's kernels. ``tensors`` is what :meth:`prepare` returned; absent inputs are ``None``."""

    def prepare(self, a: PolicyArgs) -> Tensors:
        """The kernels' inputs: ``logp``, ``old_logp``, ``ref_logp``, ``entropy``, ``mask`` as contiguous
        ``[B, T]``; ``advantages``, ``is_weights`` as ``[B, 1]`` or ``[B, T]``. ``logp`` and ``entropy`` carry
        autograd back to the caller's tensors."""

    def forward(self, a: PolicyArgs, tensors: Tensors, stats: torch.Tensor) -> None:
        """Write each row's sums over its kept tokens into ``stats`` (float32 ``[8, B]``, zeroed)."""

    def backward(self, a: PolicyArgs, tensors: Tensors, weights: torch.Tensor, grads: Tensors) -> None:
        """Write every element of ``grads["logp"]`` (``[B, T]``, logp's dtype) and of ``grads["entropy"]``
        (entropy's dtype, ``None`` without entropy) as ``weights[b]`` (float32 ``[B]``) × d(row b's loss sum) /
        d input, 0 off the mask."""


def contiguous_inputs(a: PolicyArgs) -> Tensors:
    """The kernels' inputs as :meth:`Launch.prepare` describes them, in the caller's dtypes."""

    return {
        "logp": a.logp.contiguous(),
        "old_logp": a.old_logp.detach().contiguous(),
        "ref_logp": None if a.ref_logp is None else a.ref_logp.detach().contiguous(),
        "entropy": None if a.entropy is None else a.entropy.contiguous(),
        "mask": a.mask.contiguous(),
        "advantages": a.advantages.detach(),
        "is_weights": None if a.is_weights is None else a.is_weights.detach(),
    }


def _row_and_token_strides(tensor: torch.Tensor) -> tuple[int, int]:
    """``[B, 1]`` per-sequence values broadcast over tokens with a token stride of 0."""
    return tensor.stride(0), (0 if tensor.shape[1] == 1 else tensor.stride(1))


def kernel_options(module: ModuleType, a: PolicyArgs) -> object:
    """``module.PolicyOptions`` of the arguments; ``module`` is ``fastalign._C`` or ``fastalign._host_math``."""
    return module.PolicyOptions(
        clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip, kl_coef=a.kl_coef,
        kl_kind=_KL_KIND[a.kl_estimator], entropy_coef=a.entropy_coef, log_ratio_limit=LOG_RATIO_LIMIT,
        sequence_level=a.sequence_level,
    )  # fmt: skip


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

        rows, width = tensors["logp"].shape
        advantages, weights = tensors["advantages"], tensors["is_weights"]
        positional = [
            rows, width, autotune_bucket(width), width, *_row_and_token_strides(advantages),
            *(_row_and_token_strides(weights) if weights is not None else (0, 0)),
            a.clip_low, a.clip_high, a.dual_clip or 0.0, a.kl_coef, a.entropy_coef, LOG_RATIO_LIMIT,
        ]  # fmt: skip
        flags = {
            "SEQUENCE": a.sequence_level,
            "HAS_REF": tensors["ref_logp"] is not None,
            "HAS_ENTROPY": tensors["entropy"] is not None,
            "HAS_IS": weights is not None,
            "DUAL": a.dual_clip is not None,
            "KL_KIND": _KL_KIND[a.kl_estimator],
        }
        return positional, flags

    @staticmethod
    def _pointers(tensors: Tensors, *names: str) -> list[torch.Tensor]:
        # Absent optional inputs are passed as logp, never read (their flags are off).
        return [tensors["logp"] if tensors[name] is None else tensors[name] for name in names]

    def forward(self, a: PolicyArgs, tensors: Tensors, stats: torch.Tensor) -> None:
        from fastalign.kernels.triton import policy_loss as kernels

        positional, flags = self._scalars(a, tensors)
        inputs = self._pointers(tensors, "logp", "old_logp", "ref_logp", "entropy", "advantages", "mask", "is_weights")
        kernels.policy_loss_fwd_kernel[(stats.shape[1],)](*inputs, stats, *positional, **flags)

    def backward(self, a: PolicyArgs, tensors: Tensors, weights: torch.Tensor, grads: Tensors) -> None:
        from fastalign.kernels.triton import policy_loss as kernels

        positional, flags = self._scalars(a, tensors)
        inputs = self._pointers(tensors, "logp", "old_logp", "ref_logp", "advantages", "mask", "is_weights")
        grad_logp, grad_entropy = grads["logp"], grads["entropy"]
        kernels.policy_loss_bwd_kernel[(weights.shape[0],)](
            *inputs, weights, grad_logp, grad_logp if grad_entropy is None else grad_entropy, *positional, **flags
        )


class CudaLaunch:
    """``csrc/cuda/policy_loss.cu`` through ``fastalign._C``: inputs in float32, float16 or bfloat16 (each its
    own), masks of any dtype, on the CUDA device of ``logp`` and torch's current stream there."""

    def prepare(self, a: PolicyArgs) -> Tensors:
        tensors = contiguous_inputs(a)
        # The kernels read float32 / float16 / bfloat16; float64 inputs go in as float32, the rounding the Triton
        # kernels apply on load. (The mask keeps its dtype: a float64 1e-300 must stay nonzero.)
        for name in ("old_logp", "ref_logp", "entropy", "advantages", "is_weights"):
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
        rows, tokens = tensors["logp"].shape
        return ext.PolicyProblem(
            rows=rows, tokens=tokens, logp=dense("logp"), old_logp=dense("old_logp"), ref_logp=dense("ref_logp"),
            entropy=dense("entropy"), advantages=per_row_or_token("advantages"),
            is_weights=per_row_or_token("is_weights"),
            mask=(mask.data_ptr(), mask.element_size(), mask.is_floating_point()), options=kernel_options(ext, a),
        )  # fmt: skip

    def forward(self, a: PolicyArgs, tensors: Tensors, stats: torch.Tensor) -> None:
        ext = _cuda_ext.extension()
        with _cuda_ext.launch_stream(tensors["logp"]) as stream:
            ext.policy_loss_forward(self._problem(ext, a, tensors), stats.data_ptr(), stream)

    def backward(self, a: PolicyArgs, tensors: Tensors, weights: torch.Tensor, grads: Tensors) -> None:
        ext = _cuda_ext.extension()
        with _cuda_ext.launch_stream(tensors["logp"]) as stream:
            ext.policy_loss_backward(
                self._problem(ext, a, tensors), weights.data_ptr(), grads["logp"].data_ptr(),
                _cuda_ext.ptr(grads["entropy"]), stream,
            )  # fmt: skip


# The launch of each kernel backend, by the name resolve_backend gives.
LAUNCHES: dict[str, Launch] = {"triton": TritonLaunch(), "cuda": CudaLaunch()}


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, a: PolicyArgs, tensors: Tensors, launch: Launch):
        rows, width = logp.shape
        stats = torch.zeros(STAT_ROWS, rows, dtype=torch.float32, device=logp.device)
        if rows > 0 and width > 0:
            launch.forward(a, tensors, stats)
        counts = stats[COUNT]
        weights = row_weights(
            counts, a.mode, width=width, max_completion_length=a.max_completion_length,
            num_items_in_batch=a.num_items_in_batch,
        )  # fmt: skip
        loss = (stats[LOSS] * weights).sum()
        tokens = counts.sum().clamp_min(1)
        metrics = [stats[i].sum() / tokens for i in (LOW_CLIP, HIGH_CLIP, DUAL_CLIP, RATIO, KL, ENTROPY)]
        ctx.a, ctx.tensors, ctx.launch = a, tensors, launch
        ctx.save_for_backward(weights)
        ctx.mark_non_differentiable(*metrics)
        return (loss.to(logp.dtype), *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        (weights,) = ctx.saved_tensors
        logp, entropy = ctx.tensors["logp"], ctx.tensors["entropy"]
        launching = logp.shape[0] > 0 and logp.shape[1] > 0
        # The kernels write every element of the gradients; without a launch they are empty or all zero.
        new = torch.empty_like if launching else torch.zeros_like
        grad_logp = new(logp, memory_format=torch.contiguous_format)
        grad_entropy = None if entropy is None else new(entropy, memory_format=torch.contiguous_format)
        if launching:
            row_grad = (weights * grad_loss).to(torch.float32).contiguous()
            ctx.launch.backward(ctx.a, ctx.tensors, row_grad, {"logp": grad_logp, "entropy": grad_entropy})
        return grad_logp, grad_entropy, None, None, None


def policy_loss_kernels(a: PolicyArgs, launch: Launch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fastalign.policy_loss` through one backend's kernels: ``(loss, metrics)`` as the torch path returns
    them, the loss in logp's dtype and the metrics float32 scalars (no host sync)."""
    tensors = launch.prepare(a)
    outputs = _PolicyLoss.apply(tensors["logp"], tensors["entropy"], a, tensors, launch)
    loss, low, high, dual, ratio, kl, entropy = outputs
    metrics = {"clip_frac_low": low, "clip_frac_high": high, "clip_frac_dual": dual, "ratio_mean": ratio}
    if a.ref_logp is not None:
        metrics["kl_mean"] = kl
    if a.entropy is not None:
        metrics["entropy_mean"] = entropy
    return loss, metrics
