"""TRL's ``SFTTrainer``, ``DPOTrainer`` and ``GRPOTrainer`` with fastalign's fused log-prob kernel.

TRL 1.16 computes every loss of these three trainers from one call, ``model(..., labels=labels,
fused_lm_head=True)``, answered by the chunked LM head that TRL's ``add_fused_lm_head`` puts on the model: it
returns per-token log-probs (and, on request, entropies, mean logits and whether the label is the top-1 token)
without the ``[batch, tokens, vocab]`` logits. That head is the one place where the vocabulary is touched, so it
is the seam: the subclasses here (:class:`FusedSFTTrainer`, :class:`FusedDPOTrainer`, :class:`FusedGRPOTrainer`)
are TRL's trainers built with :func:`add_fastalign_lm_head` in the place of TRL's ``add_fused_lm_head``, so the
policy and the reference model answer that call with fastalign's kernel (torch tiles on CPU, Triton on CUDA,
inside fastalign's scratch budget) after the backbone (:attr:`fastalign.models.CausalLMAdapter.backbone`). The
loss formulas, the options and the logged metrics stay TRL's own, so every loss option TRL 1.16 offers keeps its
meaning; the few whose inputs fastalign cannot produce are refused when the trainer is built (see
``docs/integrations-trl.md`` for the table).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

try:
    import trl
    from transformers import ProcessorMixin
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as error:  # TRL is optional: only this module needs it
    raise ImportError(
        "fastalign.integrations.trl needs TRL: pip install trl (tested with trl 1.16), or pip install fastalign[trl]"
    ) from error

from fastalign.models import CausalLMAdapter, unwrap_peft
from fastalign.ops.logprobs import linear_stats

__all__ = ["FusedDPOTrainer", "FusedGRPOTrainer", "FusedSFTTrainer", "add_fastalign_lm_head"]

# What the head can compute, among the per-token fields of TRL's FusedCausalLMOutput.
SUPPORTED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
# Config attributes TRL's head reads as logit multipliers that fastalign.models.CausalLMAdapter does not model.
_UNMODELLED_LOGIT_SCALES = ("output_multiplier", "lm_head_multiplier")


def _check_logit_transform(model: torch.nn.Module) -> None:
    """Refuse configs whose logit scaling TRL's head applies but :class:`CausalLMAdapter` does not know."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in _UNMODELLED_LOGIT_SCALES:
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"{type(model).__name__} scales its logits by config.{name}={getattr(config, name)!r}, which "
                "fastalign.models.CausalLMAdapter does not model; use TRL's own trainer for this model"
            )
    if getattr(config, "model_type", None) == "hyperclovax" and getattr(config, "logits_scaling", None) is not None:
        raise ValueError(
            "HyperCLOVA X multiplies its logits by config.logits_scaling, where CausalLMAdapter divides by it; "
            "use TRL's own trainer for this model"
        )


def add_fastalign_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """Answer ``model(..., labels=labels, fused_lm_head=True)`` with fastalign's fused kernel, as TRL 1.16's
    ``trl.trainer.utils.add_fused_lm_head`` answers it with TRL's (same arguments, same output).

    The call runs the backbone, keeps the positions whose next-token label is not ``-100`` and computes their
    statistics from the hidden states and the lm_head weight (``[V, D]``) without the logits; the model's softcap
    and logit scale come from :class:`fastalign.models.CausalLMAdapter`. Without ``fused_lm_head=True`` the call
    is the forward the model had before (so ``generate`` is unchanged). Installing again replaces the previous
    fastalign head; installing over TRL's head replaces TRL's for ``fused_lm_head=True`` calls.

    Args:
        model: a Hugging Face causal LM (not a PEFT wrapper: install on ``get_base_model()``, as TRL does).
        temperature: the logits are divided by it (GRPO's sampling temperature).
        cast_lm_head_to_fp32: compute the head in float32, outside autocast (GRPO's ``cast_lm_head_to_fp32``).
        outputs: the per-token fields to compute, among ``SUPPORTED_OUTPUTS``; ``log_probs`` always is.

    The call returns TRL's ``FusedCausalLMOutput``: ``log_probs`` / ``entropy`` (float32, differentiable),
    ``mean_logits`` (float32, no gradient) and ``is_top1`` / ``label_mask`` (bool), each ``[B, T - 1]`` (``[B, T]``
    with ``shift_labels``) and 0 where the label is ``-100``; ``loss`` is ``−Σ log_probs`` divided by
    ``num_items_in_batch`` (default: the number of labels). Fields not in ``outputs`` are ``None``.

    Raises:
        ValueError: an output fastalign cannot compute (``log_sum_sq_probs``), or a model whose logit transform
            the adapter does not model (see :class:`CausalLMAdapter`); from the call, an lm_head weight that is a
            sharded ``DTensor`` in the forward.
    """
    unknown = [name for name in outputs if name not in SUPPORTED_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs {unknown} cannot be computed by fastalign's head; supported: {SUPPORTED_OUTPUTS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_logit_transform(model)
    CausalLMAdapter(model)  # checks the lm_head (present, a plain weight, not under LoRA) now rather than mid-step
    previous = getattr(model.forward, "_fastalign_previous_forward", model.forward)

    @functools.wraps(type(model).forward)  # generate() validates its model kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **{k: v for k, v in extra.items() if v is not None}, **kwargs)
        return _fused_head(
            self, args, kwargs, labels, shift_labels, num_items_in_batch, temperature, cast_lm_head_to_fp32, outputs
        )

    forward._fastalign_previous_forward = previous  # type: ignore[attr-defined]
    model.forward = types.MethodType(forward, model)


def _fused_head(
    model, args, kwargs, labels, shift_labels, num_items_in_batch, temperature, cast_lm_head_to_fp32, outputs
) -> FusedCausalLMOutput:
    # The adapter is built per call: FSDP and PEFT may replace the lm_head module after installation.
    adapter = CausalLMAdapter(model)
    kwargs.pop("use_cache", None)
    hidden = adapter.backbone(*args, use_cache=False, **kwargs)[0]
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    weight, bias = adapter.weight, adapter.bias
    if isinstance(weight, DTensor):
        # TRL's head gathers it (full_tensor); fastalign's head has not been built or tested for that.
        raise ValueError(
            f"the lm_head weight of {type(model).__name__} is a sharded DTensor in the forward (tensor parallelism, "
            "or an lm_head sharded on its own), which fastalign's head does not gather; shard the lm_head with the "
            "root model (FSDP2's default) or use TRL's own trainer"
        )
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    device_type = hidden.device.type
    # TRL's precision rule: float32 when asked, else the autocast dtype when autocast is on, else the hidden's.
    if cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    # Only the scored positions go through the kernel (prompt and padding positions cost nothing).
    rows, targets = hidden[mask].to(dtype), labels[mask]
    with torch.autocast(device_type, enabled=False):
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        stats, _ = linear_stats(
            rows,
            weight,
            bias,
            targets,
            temperature=temperature * adapter.logit_temperature,
            softcap=adapter.softcap,
            ignore_index=-100,
            need_entropy="entropy" in outputs,
            need_sum="mean_logits" in outputs,
            need_top1="is_top1" in outputs,
            backend="auto",
        )
    logp, entropy, sum_logits = stats[1:4]

    def scatter(values: torch.Tensor) -> torch.Tensor:
        # masked_scatter keeps the result connected to the graph even when no label is valid.
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    log_probs = scatter(logp)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=scatter(entropy.clamp_min(0.0)) if "entropy" in outputs else None,
        mean_logits=scatter(sum_logits.detach() / weight.shape[0]) if "mean_logits" in outputs else None,
        is_top1=scatter(stats[4]) if "is_top1" in outputs else None,
        label_mask=mask,
    )


@contextlib.contextmanager
def _fastalign_heads_in(module: types.ModuleType) -> Iterator[None]:
    """While TRL's trainer module is constructing a trainer, its ``add_fused_lm_head`` is fastalign's.

    TRL installs its head in ``__init__``, before accelerate wraps the models' forward (mixed-precision autocast)
    and before DPO precomputes reference log-probs; taking its place there keeps that order and TRL's own
    arguments (temperature, outputs) for every model it equips. The swap lasts for one constructor call (so
    trainers should not be built concurrently from several threads).
    """
    original = getattr(module, "add_fused_lm_head", None)
    if original is None:
        raise RuntimeError(
            f"{module.__name__} has no add_fused_lm_head: this TRL version ({trl.__version__}) computes its losses "
            "differently from TRL 1.16, which fastalign.integrations.trl was built for"
        )
    module.add_fused_lm_head = add_fastalign_lm_head
    try:
        yield
    finally:
        module.add_fused_lm_head = original


class _FastalignHeadMixin:
    """Builds the TRL trainer with fastalign's head on its models, and refuses what that head cannot serve.

    ``_trl_trainer``: the TRL class extended. ``_refused_arguments``: ``(name, reason)`` of constructor arguments
    that only work with the full logits.
    """

    _trl_trainer: type
    _refused_arguments: tuple[tuple[str, str], ...] = ()

    def __init__(self, *args: Any, **kwargs: Any):
        self._check_construction(args, kwargs)
        with _fastalign_heads_in(sys.modules[self._trl_trainer.__module__]):
            super().__init__(*args, **kwargs)
        self._check_built()

    @classmethod
    def _check_construction(cls, args: tuple, kwargs: dict[str, Any]) -> None:
        """Refuse, before TRL builds anything, the constructor arguments and config values the head cannot serve."""
        bound = inspect.signature(cls._trl_trainer.__init__).bind(None, *args, **kwargs).arguments
        for name, reason in cls._refused_arguments:
            if bound.get(name) is not None:
                raise ValueError(f"{name}={bound[name]!r} is not supported by {cls.__name__}: {reason}")
        if is_deepspeed_zero3_enabled():
            raise ValueError(
                f"{cls.__name__} does not support DeepSpeed ZeRO-3: fastalign's backward re-reads the lm_head weight, "
                "which ZeRO-3 has partitioned again by then; use ZeRO-1/2, FSDP2 or TRL's own trainer"
            )
        if isinstance(bound.get("processing_class"), ProcessorMixin):
            raise ValueError(f"{cls.__name__} supports text-only causal LMs, not vision-language processors")
        cls._check_config(bound.get("args"))

    @classmethod
    def _check_config(cls, args: Any) -> None:
        """Refuse config values the head cannot serve (per trainer)."""

    def _check_built(self) -> None:
        """What TRL decides while building: the model kind, the MoE auxiliary loss, and that the head is ours."""
        if self._is_vlm:
            raise ValueError(f"{type(self).__name__} supports text-only causal LMs, not vision-language models")
        if self.aux_loss_enabled:
            raise ValueError(
                f"router_aux_loss_coef={self.router_aux_loss_coef} enables the mixture-of-experts load-balancing loss, "
                f"which {type(self).__name__}'s head does not compute; set router_aux_loss_coef=0.0"
            )
        policy = unwrap_peft(self.accelerator.unwrap_model(self.model))
        if not hasattr(policy.forward, "_fastalign_previous_forward"):
            raise RuntimeError(
                f"TRL {trl.__version__} built {type(self).__name__} without calling add_fused_lm_head on the model: "
                "fastalign.integrations.trl was built for TRL 1.16's seams"
            )


def _positive(args: Any, name: str) -> bool:
    """Whether the config (``None``: TRL's defaults) sets ``name`` to a true / nonzero value."""
    return bool(getattr(args, name, None))


class FusedSFTTrainer(_FastalignHeadMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss and metrics (``entropy``, ``mean_token_accuracy``) come from fastalign's fused
    kernel. Same constructor and config (``trl.SFTConfig``) as ``trl.SFTTrainer``.

    Supported as in TRL: ``loss_type`` ``"nll"`` / ``"dft"``, ``completion_only_loss``, ``assistant_only_loss``,
    ``packing`` / ``padding_free``, ``max_length``, PEFT (not on the lm_head). Refused with ``ValueError``:
    ``compute_loss_func``, ``compute_metrics`` and ``preprocess_logits_for_metrics`` (they need the full logits),
    ``label_smoothing_factor > 0`` (TRL computes it from full logits), the MoE load-balancing loss, vision-language
    models, DeepSpeed ZeRO-3.
    """

    _trl_trainer = trl.SFTTrainer
    _refused_arguments = (
        ("compute_loss_func", "it receives the model's full logits"),
        ("compute_metrics", "TRL recomputes the full logits for it in evaluation"),
        ("preprocess_logits_for_metrics", "TRL recomputes the full logits for it in evaluation"),
    )

    @classmethod
    def _check_config(cls, args: Any) -> None:
        if _positive(args, "label_smoothing_factor"):
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} is not supported by FusedSFTTrainer: TRL "
                "computes the smoothed loss from the full logits; set it to 0"
            )


class FusedDPOTrainer(_FastalignHeadMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` whose policy and reference log-probs (also when precomputed) and metrics (``entropy``,
    ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``, ``rewards/*``, ``logps/*``) come from fastalign's
    fused kernel. Same constructor and config (``trl.DPOConfig``) as ``trl.DPOTrainer``.

    Supported as in TRL: every ``loss_type`` (lists, ``loss_weights``), ``beta``, ``label_smoothing``,
    ``ld_alpha``, ``f_divergence_type`` / ``f_alpha_divergence_coef``, ``discopop_tau``,
    ``precompute_ref_log_probs``, ``sync_ref_model``, PEFT references. Refused with ``ValueError``:
    ``use_weighting=True`` (WPO needs ``log Σ p²`` per token, which fastalign's kernel does not compute),
    ``compute_metrics`` (needs the full logits), the MoE load-balancing loss, vision-language models, ZeRO-3.
    """

    _trl_trainer = trl.DPOTrainer
    _refused_arguments = (("compute_metrics", "TRL recomputes the full logits for it in evaluation"),)

    @classmethod
    def _check_config(cls, args: Any) -> None:
        if _positive(args, "use_weighting"):
            raise ValueError(
                "use_weighting=True is not supported by FusedDPOTrainer: WPO weights need log Σ_v p_v² per token, "
                "which fastalign's fused kernel does not compute; set use_weighting=False"
            )


class FusedGRPOTrainer(_FastalignHeadMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies (policy, old policy, reference) come from
    fastalign's fused kernel at the sampling temperature. Same constructor and config (``trl.GRPOConfig``).

    Every loss TRL builds on those (every ``loss_type``, ``beta``, ``epsilon`` / ``epsilon_high``, ``delta``,
    ``importance_sampling_level``, ``top_entropy_quantile``, ``entropy_coef`` and the adaptive entropy control,
    ``off_policy_mask_threshold``, ``use_bias_correction_kl``, ``mask_truncated_completions``, vLLM's importance
    sampling correction, ``cast_lm_head_to_fp32``) is TRL's code on fastalign's log-probs. Refused with
    ``ValueError``: the MoE load-balancing loss, vision-language models, DeepSpeed ZeRO-3. Generation (TRL's,
    or vLLM) is unchanged.
    """

    _trl_trainer = trl.GRPOTrainer
