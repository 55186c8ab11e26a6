"""Patch one Hugging Face causal LM so ``forward(labels=...)`` computes its loss without materialising the logits.

:func:`patch_model` binds two methods on the model *instance* (its class and every other instance are untouched):

* ``forward``: with ``labels``, the backbone's last hidden states go with the lm_head weight to
  :func:`fastalign.linear_cross_entropy`, and the output's ``logits`` is ``None``; without ``labels`` it is the
  class's own ``forward``, unchanged (generation and evaluation still see full logits).
* ``token_logprobs``: per-token log-probs (and entropies) of given token ids, also without the logits.

:func:`unpatch_model` removes both again. Both functions take a ``peft.PeftModel`` too: the Hugging Face model
inside it is patched, and that is the model the ``PeftModel``'s own ``forward`` and ``generate`` call.

The lm_head, softcap and logit scale come from :class:`~fastalign.models.CausalLMAdapter`, so the patch is exact
for the models it covers: logits ``lm_head(hidden)``, then optionally Gemma's final-logit softcapping or a
Cohere/Granite logit scale.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fastalign.models.causal_lm import CausalLMAdapter, shift_labels, unwrap_peft
from fastalign.ops.cross_entropy import linear_cross_entropy

__all__ = ["patch_model", "unpatch_model"]

_PATCHED = "_fastalign_patched"  # set on the functions patch_model binds, to recognise them later
_METHODS = ("forward", "token_logprobs")


def _is_ours(method: Any) -> bool:
    return getattr(getattr(method, "__func__", None), _PATCHED, False)


def _check_loss_function(model: torch.nn.Module) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    loss_function = getattr(model, "loss_function", None)
    if loss_function is not ForCausalLMLoss:
        raise ValueError(
            f"{type(model).__name__}.loss_function is {loss_function!r}, not transformers' ForCausalLMLoss "
            "(a custom loss_function or config loss_type): the patched forward would compute a different loss"
        )


def patch_model(model: torch.nn.Module, *, backend: str = "auto") -> torch.nn.Module:
    """Make this one causal LM compute ``forward(labels=...)``'s loss with the fused cross-entropy.

    After patching, ``model(input_ids, attention_mask=..., labels=labels)`` returns a
    ``transformers.modeling_outputs.CausalLMOutputWithPast`` whose ``loss`` equals Hugging Face's (labels shifted
    inside, mean over the non-ignored tokens) and whose ``logits`` is ``None``: the ``[B, T, V]`` logits are never
    made. The loss keywords of Hugging Face's ``ForCausalLMLoss`` keep their meaning: ``num_items_in_batch`` (the
    loss is then the sum over tokens divided by it, as ``transformers.Trainer`` passes it under gradient
    accumulation), ``shift_labels`` (already shifted ``[B, T]`` targets, used instead of shifting ``labels``)
    and ``ignore_index`` (default -100). Other keywords go to the backbone as in the original ``forward``, whose
    outputs (``past_key_values``, ``hidden_states``, ``attentions``) are returned; ``return_dict=False`` gives
    ``output.to_tuple()`` (loss first, no logits). Without ``labels`` the original ``forward`` runs unchanged.
    Two differences from Hugging Face: the loss is float64 for a float64 model (Hugging Face computes it in
    float32), and a batch whose tokens are all ignored has loss 0, not NaN.

    Also bound: ``model.token_logprobs(input_ids, attention_mask=None, *, labels=None, targets=None,
    position_ids=None, temperature=1.0, return_entropy=False)`` -> ``[B, T]`` float32 log-probs of the given ids
    (``labels`` not shifted, ``targets`` already shifted; ``help(model.token_logprobs)`` has the details).

    Patching is per instance (the class is not touched), idempotent (patching again replaces the first patch,
    e.g. to change ``backend``) and undone by :func:`unpatch_model`. ``copy.deepcopy`` of a patched model gives
    a patched copy.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``) or a ``peft.PeftModel`` around one.
        backend: the fused ops' backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Returns:
        ``model`` itself (the same object), patched.

    Raises:
        ValueError: ``model`` has no lm_head (``get_output_embeddings()`` is ``None``) or no ``labels`` argument
            in its ``forward``; the lm_head is under LoRA/PEFT; its loss function is not ``ForCausalLMLoss``;
            or ``model.forward`` was already replaced on the instance by something else (e.g. accelerate's
            ``prepare``: patch first, wrap after).
    """
    inner = unwrap_peft(model)
    if _is_ours(inner.__dict__.get("forward")):
        unpatch_model(inner)
    CausalLMAdapter(inner)  # refuses models without an lm_head, LoRA on the lm_head, softcap + scale
    for name in _METHODS:
        if name in inner.__dict__:
            raise ValueError(
                f"model.{name} is already set on this instance ({inner.__dict__[name]!r}), e.g. by accelerate's "
                "prepare() or another patch: call patch_model on the plain model, before such wrappers"
            )
    original = type(inner).forward
    signature = inspect.signature(original)
    if "labels" not in signature.parameters:
        raise ValueError(f"{type(inner).__name__}.forward has no `labels` argument: expected a causal LM")
    _check_loss_function(inner)
    inner.forward = _make_forward(original, signature, backend).__get__(inner)
    inner.token_logprobs = _make_token_logprobs(backend).__get__(inner)
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_model`: the class's ``forward`` is used again and ``token_logprobs`` is gone.

    A model that is not patched is returned as it is.

    Raises:
        ValueError: ``model.forward`` was wrapped by something else after patching (unwrap that first).
    """
    inner = unwrap_peft(model)
    patched = [name for name in _METHODS if _is_ours(inner.__dict__.get(name))]
    if not patched:
        return model
    if "forward" not in patched:
        raise ValueError(
            f"model.forward was replaced after patch_model ({inner.__dict__.get('forward')!r}): remove that "
            "wrapper before unpatch_model"
        )
    for name in patched:
        delattr(inner, name)
    return model


def _make_forward(original: Callable[..., Any], signature: inspect.Signature, backend: str) -> Callable[..., Any]:
    """The patched ``forward``: the fused loss when ``labels`` is given, else ``original`` unchanged."""
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    # functools.wraps keeps the original's signature visible to inspect: transformers.Trainer (which columns
    # to keep, whether to pass num_items_in_batch) and generate (which model kwargs are valid) read it.
    @functools.wraps(original)
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        if bound.arguments.get("labels") is None:
            return original(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        arguments.update(arguments.pop(var_keyword, {}) if var_keyword else {})
        return _fused_forward(self, arguments, backend)

    setattr(forward, _PATCHED, True)
    return forward


def _fused_forward(model: torch.nn.Module, arguments: dict[str, Any], backend: str) -> Any:
    """Hugging Face's causal-LM forward with labels, its loss from hidden states and the lm_head weight."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = arguments.pop("labels")
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:  # as transformers' can_return_tuple decides
        return_dict = getattr(model.config, "return_dict", True)
    targets = arguments.pop("shift_labels", None)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    ignore_index = arguments.pop("ignore_index", -100)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError(
            f"logits_to_keep={logits_to_keep!r} with labels: the patched forward computes the loss over every "
            "position and returns no logits; pass logits_to_keep=0 (the default) when passing labels"
        )
    router_logits = arguments.get("output_router_logits")
    if router_logits is None:
        router_logits = getattr(model.config, "output_router_logits", False)
    if router_logits:
        raise ValueError(
            "output_router_logits=True (argument or config) with labels: the MoE router's auxiliary loss, which "
            "Hugging Face adds to the loss, is not supported by the patched forward; set it to False"
        )
    _check_loss_function(model)
    adapter = CausalLMAdapter(model)

    outputs = adapter.backbone(**arguments, return_dict=True)
    hidden = outputs.last_hidden_state
    if targets is None:
        targets = shift_labels(labels, ignore_index)
    bias = adapter.bias
    if adapter.logit_temperature != 1.0:
        # linear_cross_entropy has no temperature: (h / t) @ W.T + b / t == (h @ W.T + b) / t.
        hidden = hidden / adapter.logit_temperature
        bias = None if bias is None else bias / adapter.logit_temperature
    loss = linear_cross_entropy(
        hidden,
        adapter.weight,
        targets.to(hidden.device),
        bias=bias,
        ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
        softcap=adapter.softcap,
        backend=backend,
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    output = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=outputs.get("past_key_values"),
        hidden_states=outputs.get("hidden_states"),
        attentions=outputs.get("attentions"),
    )
    return output if return_dict else output.to_tuple()


def _make_token_logprobs(backend: str) -> Callable[..., Any]:
    # functools.wraps: help() and inspect.signature show _token_logprobs' keywords and docstring.
    @functools.wraps(_token_logprobs)
    def token_logprobs(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _token_logprobs(self, *args, **{"backend": backend, **kwargs})

    setattr(token_logprobs, _PATCHED, True)
    return token_logprobs


def _token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each given token id under the model (``log_softmax(logits / temperature)`` at that id).

    ``out[b, t]`` is always the log-prob of the id passed at ``[b, t]``, so ``out.sum(-1)`` is a sequence's
    log-likelihood whichever form is used. Give at most one of:

    * ``labels``: ``[B, T]`` ids in Hugging Face's convention, *not shifted* (``labels[:, t]`` is the token at
      position ``t``, usually ``input_ids`` with ``-100`` where no log-prob is wanted). ``out[:, t]`` is
      ``log p(labels[:, t] | input_ids[:, :t])``; ``out[:, 0]`` is 0 (nothing predicts the first token).
    * ``targets``: ``[B, T]`` ids *already shifted* (``targets[:, t]`` is the token that follows position ``t``,
      as :func:`fastalign.models.shift_labels` makes them). ``out[:, t]`` is
      ``log p(targets[:, t] | input_ids[:, :t + 1])``.
    * neither: the log-probs of ``input_ids`` themselves, i.e. ``labels=input_ids`` with the padding
      (``attention_mask == 0``) ignored.

    Args:
        input_ids: ``[B, T]`` int64. attention_mask: ``[B, T]`` (1 = token, 0 = padding) or ``None``.
        position_ids: ``[B, T]`` or ``None`` (the model's default).
        temperature: > 0, on top of the model's own logit scale and softcap.
        return_entropy: also return the entropy of the distribution each log-prob is taken from.

    Returns:
        ``logp [B, T]`` float32 (float64 for a float64 model), or ``(logp, entropy)`` of the same shape and
        alignment; 0 (and no gradient) where the id is ``-100``. Differentiable with respect to the model's
        parameters; wrap in ``torch.no_grad()`` for a reference model.
    """
    if labels is not None and targets is not None:
        raise ValueError("pass labels (not shifted) or targets (already shifted), not both")
    adapter = CausalLMAdapter(model)
    if targets is not None:
        return adapter.token_logprobs(
            input_ids,
            attention_mask,
            targets,
            position_ids=position_ids,
            temperature=temperature,
            return_entropy=return_entropy,
            backend=backend,
        )
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    result = adapter.token_logprobs(
        input_ids,
        attention_mask,
        shift_labels(labels),
        position_ids=position_ids,
        temperature=temperature,
        return_entropy=return_entropy,
        backend=backend,
    )

    def align(values: torch.Tensor) -> torch.Tensor:
        # values[:, t] belongs to labels[:, t + 1]: move it one position right, 0 in front.
        return F.pad(values[..., :-1], (1, 0))

    return tuple(align(v) for v in result) if return_entropy else align(result)
