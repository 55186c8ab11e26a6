"""Causal-LM adapter: backbone hidden states plus lm_head access, so the fused ops replace the lm_head call.

Training never calls the model's full-sequence lm_head (that would materialise ``[B, T, V]`` logits): the
adapter runs the backbone to get the last hidden states ``[B, T, D]`` and hands them, with the lm_head weight
``[V, D]`` and bias, to :func:`fastalign.linear_logprobs` / :func:`fastalign.linear_cross_entropy`. What the
model's own ``forward`` does to its logits after the lm_head is read from the config and passed to the ops:

* ``final_logit_softcapping`` (Gemma 2/3): ``z ← c · tanh(z / c)`` → the ops' ``softcap``;
* ``logit_scale`` (Cohere: ``z ← z · s``) and ``logits_scaling`` (Granite: ``z ← z / s``) → a fixed divisor
  :attr:`CausalLMAdapter.logit_temperature` folded into the ops' ``temperature``.

Works through a PEFT wrapper (LoRA on the backbone); LoRA on the lm_head itself is refused.

Multi-process training: the adapter also takes the model as a trainer hands it over, wrapped in
``DistributedDataParallel`` (or a DeepSpeed engine) or sharded with FSDP2's ``fully_shard``. Those wrappers only
do their work when the model's forward runs (DDP prepares its gradient all-reduce, FSDP2 all-gathers the sharded
parameters, the lm_head's among them), and the fused path never calls the model: :meth:`CausalLMAdapter.fused_forward`
therefore runs backbone and fused op *as* the model's forward, through the wrapper.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from fastalign.models.paths import check_model_path
from fastalign.ops.cross_entropy import linear_cross_entropy
from fastalign.ops.logprobs import linear_logprobs

_T = TypeVar("_T")

__all__ = [
    "CausalLMAdapter",
    "load_causal_lm",
    "select_attention_implementation",
    "shift_labels",
    "unwrap_peft",
]


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a PEFT ``PeftModel`` (LoRA layers stay injected in it), else ``model``.

    peft is optional and imported by nobody here: a model can only be a ``PeftModel`` if peft is already imported.
    """
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def _unwrap_data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper or a DeepSpeed engine, else ``model``."""
    # DeepSpeedEngine by name: deepspeed is optional and its import is slow; both wrappers keep the model in .module.
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def _is_fsdp2(module: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _is_peft_module(module: torch.nn.Module) -> bool:
    # LoRA layers (peft.tuners.lora.Linear) and modules_to_save wrappers both live in peft's namespace; their
    # output is not `hidden @ weight.T + bias` of one plain weight, so the fused ops cannot stand in for them.
    return type(module).__module__.split(".")[0] == "peft"


def _text_config(config: Any) -> Any:
    # Multimodal configs (Gemma 3) keep the language model's settings in a sub-config.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets: ``targets[..., t] = labels[..., t + 1]``, and ``ignore_index`` at the last position.

    Args:
        labels: ``[B, T]`` integer ids (``ignore_index`` where no loss is wanted; HF's ``labels`` convention).

    Returns:
        ``[B, T]`` int64, aligned with the hidden states: position ``t`` predicts token ``t + 1``.
    """
    targets = torch.full_like(labels, ignore_index, dtype=torch.long)
    targets[..., :-1] = labels[..., 1:]
    return targets


class CausalLMAdapter:
    """A Hugging Face causal LM seen as ``backbone -> hidden [B, T, D]`` plus an lm_head ``weight [V, D]``/``bias``.

    Built from any ``AutoModelForCausalLM`` model (or a ``PeftModel`` around one), also when it is wrapped in
    ``DistributedDataParallel`` / a DeepSpeed engine or sharded with FSDP2 (see :meth:`fused_forward`). It holds
    no parameters of its own: :attr:`weight` and :attr:`bias` are the model's lm_head tensors (the input embedding
    when tied), so gradients land on the model's parameters exactly as in the eager path.

    Attributes:
        model: the unwrapped Hugging Face model (LoRA layers, if any, are inside it).
        wrapper: the module as given (the one whose call runs the DDP / FSDP2 / DeepSpeed forward machinery).
        softcap: final-logit softcapping from the config, or ``None``.
        logit_temperature: the model's fixed logit divisor (``1 / logit_scale`` for Cohere, ``logits_scaling``
            for Granite, else 1.0); the ops get ``temperature * logit_temperature``.

    Raises:
        ValueError: no output embeddings, an lm_head under LoRA/PEFT, or both a softcap and a logit scale.

    Example:
        >>> adapter = CausalLMAdapter(model)
        >>> targets = shift_labels(input_ids.masked_fill(attention_mask == 0, -100))
        >>> logp = adapter.token_logprobs(input_ids, attention_mask, targets)  # [B, T] float32
    """

    def __init__(self, model: torch.nn.Module):
        self.wrapper = model
        self._root = _unwrap_data_parallel(model)
        self.model = unwrap_peft(self._root)
        get_out = getattr(self.model, "get_output_embeddings", None)
        lm_head = get_out() if get_out is not None else None
        if lm_head is None:
            raise ValueError(
                f"{type(self.model).__name__} has no output embeddings (get_output_embeddings() is None): "
                "CausalLMAdapter needs a causal LM with an lm_head (AutoModelForCausalLM)"
            )
        if _is_peft_module(lm_head):
            raise ValueError(
                f"the lm_head is a PEFT module ({type(lm_head).__name__}): LoRA or modules_to_save on lm_head "
                "is not supported by the fused ops; leave lm_head out of target_modules/modules_to_save"
            )
        weight = getattr(lm_head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"the lm_head ({type(lm_head).__name__}) has no [V, D] weight tensor")
        self.lm_head = lm_head
        config = _text_config(self.model.config)
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.logit_temperature: float = _logit_temperature(config)
        if self.softcap is not None and self.logit_temperature != 1.0:
            # Softcap-then-scale and scale-then-softcap give different logits; no known model has both.
            raise ValueError(
                f"config has both final_logit_softcapping={self.softcap} and a logit scale "
                f"(logit temperature {self.logit_temperature}); their order is ambiguous, refusing"
            )

    @property
    def weight(self) -> torch.Tensor:
        """lm_head weight ``[V, D]`` (the input embedding matrix when embeddings are tied)."""
        return self.lm_head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """lm_head bias ``[V]`` or ``None``."""
        return getattr(self.lm_head, "bias", None)

    @property
    def backbone(self) -> torch.nn.Module:
        """The decoder stack without the lm_head (``model.model`` for Llama-style models)."""
        return self.model.base_model

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Last hidden states ``[B, T, D]`` (model dtype), after the final norm, before the lm_head.

        Args:
            input_ids: ``[B, T]`` int64. attention_mask: ``[B, T]`` (1 = token, 0 = pad) or ``None``.
            position_ids: ``[B, T]`` or ``None`` (the model's default). ``kwargs`` go to the backbone.
        """
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        )
        return out[0]

    def fused_forward(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], _T],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> _T:
        """``fn(hidden, weight, bias)`` on the backbone's last hidden states, run as one forward of the model.

        ``hidden`` is ``[B, T, D]`` (model dtype, :meth:`hidden_states`), ``weight`` the lm_head ``[V, D]`` and
        ``bias`` ``[V]`` or ``None``; whatever ``fn`` returns (a loss, log-probs, a tuple or dict of tensors) is
        returned. On a plain model this is just ``fn(self.hidden_states(...), self.weight, self.bias)``. On a
        wrapped or sharded model the model's ``forward`` is swapped for this computation for the length of one
        call through :attr:`wrapper`, so the distributed machinery sees a normal forward:

        * DDP: the reducer is armed for this backward and, with ``find_unused_parameters``, finds the lm_head
          in the graph (a forward that returned only hidden states would report it unused);
        * FSDP2 (``fully_shard`` on the root model, as accelerate applies it): the root's pre-forward hook
          all-gathers the lm_head weight (a sharded ``DTensor`` outside the forward), ``fn`` gets the full
          ``[V, D]`` tensor, and its gradient is reduce-scattered back onto each rank's shard in the backward.

        Args:
            fn: ``(hidden [B, T, D], weight [V, D], bias [V] | None) -> result``.
            input_ids: ``[B, T]`` int64. attention_mask, position_ids: ``[B, T]`` or ``None``; ``kwargs`` go to
                the backbone.
        """

        def body() -> _T:
            hidden = self.hidden_states(input_ids, attention_mask, position_ids, **kwargs)
            return fn(hidden, self.weight, self.bias)

        root = self._root
        if (self.wrapper is root and not _is_fsdp2(root)) or getattr(root.__dict__.get("forward"), "_fastalign", False):
            return body()  # a plain model, or already inside a fused forward of this model

        def forward(*args: Any, **forward_kwargs: Any) -> _T:
            return body()

        forward._fastalign = True  # type: ignore[attr-defined]
        # An instance-level forward (accelerate's device hooks set one) is put back afterwards.
        saved = root.__dict__.get("forward")
        root.forward = forward
        try:
            return self.wrapper()
        finally:
            if saved is None:
                del root.forward
            else:
                root.forward = saved

    def token_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        targets: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
        backend: str = "auto",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Log-prob (and entropy) of each target token under the model, without materialising the logits.

        Equals ``log_softmax(model(input_ids).logits / temperature)`` gathered at ``targets``.

        Args:
            input_ids, attention_mask: ``[B, T]``.
            targets: ``[B, T]`` ids already shifted (position ``t`` holds token ``t + 1``, see
                :func:`shift_labels`); ``-100`` positions get 0 and pass no gradient.
            temperature: sampling temperature (> 0), applied on top of the model's own logit scale.

        Returns:
            ``logp [B, T]`` float32 (or ``(logp, entropy)``), differentiable w.r.t. the model's parameters.
        """

        def logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
            return linear_logprobs(
                hidden,
                weight,
                targets,
                bias=bias,
                temperature=temperature * self.logit_temperature,
                softcap=self.softcap,
                return_entropy=return_entropy,
                backend=backend,
            )

        return self.fused_forward(logprobs, input_ids, attention_mask, position_ids)

    def cross_entropy_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        targets: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        backend: str = "auto",
    ) -> torch.Tensor:
        """SFT / pre-training cross-entropy of the model on shifted ``targets`` (``-100`` ignored).

        Equals ``F.cross_entropy(model(input_ids).logits, targets, ...)`` (with the model's softcap and logit
        scale); see :func:`fastalign.linear_cross_entropy` for ``reduction``, ``label_smoothing`` and ``z_loss``.

        Returns:
            float32 scalar, or ``[B, T]`` per-token losses for ``reduction="none"``.
        """

        def loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if self.logit_temperature != 1.0:
                # linear_cross_entropy takes no temperature: fold the scale into the (smaller) hidden side instead,
                # (h / t) @ W.T + b / t == (h @ W.T + b) / t. Exact up to one rounding of h in low precision.
                hidden = hidden / self.logit_temperature
                bias = None if bias is None else bias / self.logit_temperature
            return linear_cross_entropy(
                hidden,
                weight,
                targets,
                bias=bias,
                reduction=reduction,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                softcap=self.softcap,
                backend=backend,
            )

        return self.fused_forward(loss, input_ids, attention_mask, position_ids)


def _logit_temperature(config: Any) -> float:
    """The divisor the model's forward applies to its logits, from the config (1.0 when none)."""
    divisor = 1.0
    scale = getattr(config, "logit_scale", None)  # Cohere / Cohere2: logits * logit_scale
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"config.logit_scale must be > 0, got {scale}")
        divisor /= float(scale)
    scaling = getattr(config, "logits_scaling", None)  # Granite / GraniteMoE: logits / logits_scaling
    if scaling is not None:
        if not scaling > 0:
            raise ValueError(f"config.logits_scaling must be > 0, got {scaling}")
        divisor *= float(scaling)
    return divisor


def _flash_attn_available() -> bool:
    # find_spec, not import: importing flash_attn initialises CUDA. No CUDA device means it cannot run anyway.
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def select_attention_implementation(requested: str | None = None, model_class: type | None = None) -> str:
    """The attention implementation to load a model with.

    ``requested`` when given (passed through unchecked: Hugging Face validates it). Otherwise
    ``"flash_attention_2"`` when ``flash_attn`` is installed and CUDA is available, else ``"sdpa"``. With
    ``model_class``, an automatic choice the class does not support steps down (flash → sdpa → eager): Gemma 2,
    for one, has no sdpa path because sdpa cannot softcap attention scores.
    """
    if requested is not None:
        return requested
    choices = ["sdpa", "eager"]
    if _flash_attn_available():
        choices.insert(0, "flash_attention_2")
    if model_class is None:
        return choices[0]
    supported = {
        "flash_attention_2": getattr(model_class, "_supports_flash_attn", False),
        "sdpa": getattr(model_class, "_supports_sdpa", False),
        "eager": True,
    }
    return next(choice for choice in choices if supported[choice])


def _model_class(auto_class: Any, name_or_path: str, **kwargs: Any) -> type | None:
    """The class ``auto_class.from_pretrained`` would build, or ``None`` if it cannot be told from the config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        return auto_class._model_mapping[type(config)]
    except (KeyError, ValueError, OSError):
        return None


def resolve_attention(auto_class: Any, name_or_path: str, requested: str | None, kwargs: dict[str, Any]) -> str:
    """:func:`select_attention_implementation` for the class ``auto_class`` will load from ``name_or_path``."""
    if requested is not None:
        return requested
    config_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code", "token") if k in kwargs}
    return select_attention_implementation(None, _model_class(auto_class, name_or_path, **config_kwargs))


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the attention picked by :func:`select_attention_implementation`.

    Args:
        name_or_path: hub id or local directory.
        dtype: parameter dtype (``torch.bfloat16``, ``"auto"``, ...); ``None`` keeps transformers' default.
        attn_implementation: ``"flash_attention_2" | "sdpa" | "eager" | ...``; ``None`` picks automatically.
        kwargs: passed to ``from_pretrained``.

    Raises:
        FileNotFoundError: ``name_or_path`` is a local path (``./model``, ``/abs/model``, ``runs/a/b``) that does
            not exist.
    """
    from transformers import AutoModelForCausalLM

    check_model_path(name_or_path)
    attn_implementation = resolve_attention(AutoModelForCausalLM, name_or_path, attn_implementation, kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation=attn_implementation, **kwargs)
