"""``torch.nn.Module`` wrappers of the fused-linear losses: they take the model's hidden states and the lm_head
weight (never logits) and compute the loss from per-token log-probs of the target tokens.

* :class:`LinearCrossEntropy` — SFT / pre-training.
* :class:`LinearPolicyLoss` — PPO / GRPO / DAPO / GSPO on completion tokens.
* :class:`LinearDPOLoss` — the DPO family on chosen/rejected rows of one batch.

Each module has two exact paths. ``gradient_in_forward=True`` computes the hidden/weight gradients during the
forward sweep (:func:`fastalign.ops.fused_linear.fused_linear_loss`: each chunk's logits are materialised once
inside the scratch budget and become their gradient in place, 6·N·D·V flops) and ``backward()`` only scales
them; ``False`` builds the loss on the autograd log-prob op, whose backward recomputes the logits (8·N·D·V flops).
The default, ``None``, is the second on every device. On CPU it measured faster at the default 32 MiB budget.
On CUDA ``python -m bench.roofline`` (N=16384, D=4096, V=131072, bf16, H100, not yet measured) predicts the first
at 61.7 ms (58.3 ms with a 512 MiB budget) against the grouped Triton kernels' 71.4 ms, but it holds a float32
weight gradient (``4·V·D`` bytes, 2 GiB there) from the forward to the backward where the second holds ~0.5 GiB
of scratch: the default stays on the smaller memory until a GPU run measures both (``bench/gpu_check.sh`` times
them as ``fastalign-fused`` and ``fastalign-triton``). The first path applies only when a gradient is needed; the
loss must then be the last step (its ``backward`` takes the upstream scalar).
"""

from __future__ import annotations

import torch

from fastalign.ops._dpo_math import DPOLossOptions
from fastalign.ops._options import options_from, renamed_keywords, with_option_fields
from fastalign.ops._policy_math import PolicyChunks, PolicyLossOptions, check_policy_args
from fastalign.ops.cross_entropy import check_cross_entropy_options, cross_entropy_terms, linear_cross_entropy
from fastalign.ops.fused_linear import ChunkStats, fused_linear_loss
from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.policy import policy_loss
from fastalign.ops.preference import dpo_loss_from_token_logps


def _fused_gradient(choice: bool | None, *tensors: torch.Tensor | None) -> bool:
    """Whether to form the gradient in the forward: a gradient is needed, and the choice says so (``None``: no,
    see the module docstring)."""
    present = [t for t in tensors if t is not None]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in present):
        return False
    return bool(choice)


class LinearCrossEntropy(torch.nn.Module):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets``; see :func:`fastalign.linear_cross_entropy`.

    ``forward(hidden [..., D], weight [V, D], targets [...], bias=None) -> loss``.

    Example:
        >>> import torch, fastalign
        >>> loss_fn = fastalign.nn.LinearCrossEntropy(label_smoothing=0.1)
        >>> hidden, weight = torch.randn(2, 8, 16, requires_grad=True), torch.randn(100, 16)
        >>> loss_fn(hidden, weight, torch.randint(0, 100, (2, 8))).backward()
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        gradient_in_forward: bool | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.backend = z_loss, softcap, backend
        self.gradient_in_forward = gradient_in_forward

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        options = {"ignore_index": self.ignore_index, "softcap": self.softcap, "backend": self.backend}
        smoothing, z_loss = self.label_smoothing, self.z_loss
        if self.reduction == "none" or not _fused_gradient(self.gradient_in_forward, hidden, weight, bias):
            loss_options = {"reduction": self.reduction, "label_smoothing": smoothing, "z_loss": z_loss}
            return linear_cross_entropy(hidden, weight, targets, bias=bias, **loss_options, **options)
        check_cross_entropy_options(self.reduction, smoothing, z_loss)
        count = (targets != self.ignore_index).sum().clamp_min(1) if self.reduction == "mean" else 1
        vocab_size = weight.shape[0]

        def chunk_loss(index: torch.Tensor, s: ChunkStats) -> torch.Tensor:
            loss = cross_entropy_terms(s.logp, s.lse, s.sum_logits, vocab_size, smoothing, z_loss)
            return torch.where(s.valid, loss, 0.0).sum() / count

        return fused_linear_loss(hidden, weight, targets, chunk_loss, bias=bias, need_sum=smoothing > 0, **options).loss


class LinearPolicyLoss(torch.nn.Module):
    """The policy loss of :func:`fastalign.policy_loss` from the hidden states of the completion tokens.

    The per-token log-probs (and the entropy, only when ``entropy_coef`` needs it) use this module's
    ``temperature`` and ``softcap`` — the temperature the rollout sampled with, as TRL divides the logits by it.
    The loss options are a :class:`~fastalign.ops.PolicyLossOptions` (``options=``) or its fields as keywords.

    ``forward(hidden [B, T, D], weight [V, D], targets [B, T], old_logps [B, T], advantages [B] | [B, T], *,
    mask=None, ref_logps=None, is_weights=None, num_items_in_batch=None, bias=None, sampler_logps=None) -> (loss,
    metrics)``; ``mask`` defaults to ``targets != ignore_index``. With ``top_entropy_quantile < 1`` the log-probs
    and entropies are computed first (``linear_logprobs``) and the loss after them: the quantile needs them all.
    ``old_logp`` / ``ref_logp`` are the deprecated names of ``old_logps`` / ``ref_logps``.

    Example:
        >>> import torch, fastalign
        >>> loss_fn = fastalign.nn.LinearPolicyLoss(loss_type="dapo", clip_eps_high=0.28)
        >>> hidden, weight = torch.randn(4, 6, 16, requires_grad=True), torch.randn(50, 16)
        >>> targets = torch.randint(0, 50, (4, 6))
        >>> old_logps = fastalign.linear_logprobs(hidden.detach(), weight, targets)
        >>> loss, metrics = loss_fn(hidden, weight, targets, old_logps, advantages=torch.randn(4))
        >>> loss.backward()
    """

    @with_option_fields(PolicyLossOptions)
    def __init__(
        self,
        *,
        temperature: float = 1.0,
        softcap: float | None = None,
        ignore_index: int = -100,
        options: PolicyLossOptions | None = None,
        gradient_in_forward: bool | None = None,
        backend: str = "auto",
        **option_fields,
    ):
        super().__init__()
        self.temperature, self.softcap, self.ignore_index, self.backend = temperature, softcap, ignore_index, backend
        self.gradient_in_forward = gradient_in_forward
        self.options = options_from(PolicyLossOptions, options, option_fields, "LinearPolicyLoss")

    @renamed_keywords(old_logp="old_logps", ref_logp="ref_logps")
    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        is_weights: torch.Tensor | None = None,
        num_items_in_batch: int | float | torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        sampler_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        top_entropy = self.options.top_entropy_quantile < 1
        need_entropy = self.options.entropy_coef != 0 or top_entropy
        if mask is None:
            mask = targets != self.ignore_index
        extra = {
            "ref_logps": ref_logps,
            "is_weights": is_weights,
            "num_items_in_batch": num_items_in_batch,
            "sampler_logps": sampler_logps,
        }
        logprob_options = _logprob_options(self)
        # The top-entropy mask ranks every token's entropy before any token's loss: one chunked sweep cannot.
        if top_entropy or not _fused_gradient(self.gradient_in_forward, hidden, weight, bias):
            out = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=need_entropy, **logprob_options)
            logps, entropy = out if need_entropy else (out, None)
            options = {"options": self.options, "backend": self.backend}
            return policy_loss(logps, old_logps, advantages, mask, entropy=entropy, **options, **extra)
        # logps and entropy are filled in chunk by chunk; a placeholder shaped like targets is checked against here.
        placeholder = torch.zeros(targets.shape, device=targets.device)
        entropy = placeholder if need_entropy else None
        args = check_policy_args(
            placeholder, old_logps, advantages, mask, entropy=entropy, options=self.options, **extra
        )
        chunks = PolicyChunks(args)

        def chunk_loss(index: torch.Tensor, s: ChunkStats) -> torch.Tensor:
            return chunks.loss(index, s.logp, s.entropy)

        result = fused_linear_loss(
            hidden,
            weight,
            targets,
            chunk_loss,
            bias=bias,
            units=chunks.units,
            need_entropy=need_entropy,
            **logprob_options,
        )
        return result.loss, chunks.metrics()


class LinearDPOLoss(torch.nn.Module):
    """The DPO family (:func:`fastalign.dpo_loss`) from hidden states, chosen rows first and rejected rows second.

    ``forward(hidden [2B, T, D], weight [V, D], targets [2B, T], *, ref_chosen_logps=None, ref_rejected_logps=None,
    ref_hidden=None, ref_weight=None, bias=None, ref_bias=None) -> (loss, metrics)``.

    * ``targets`` hold the completion token ids and ``ignore_index`` elsewhere (prompt, padding); sequence
      log-probs are sums over completion tokens.
    * The reference is either precomputed (``ref_chosen_logps``, ``ref_rejected_logps``: ``[B]`` sums over the
      completion tokens, as TRL's ``precompute_ref_log_probs`` stores them; zeros for reference-free SimPO/CPO)
      or computed here without gradient from a reference model's ``(ref_hidden, ref_weight[, ref_bias])``.
    * ``average_log_prob``: ``True`` length-normalises every type's log-probs (SimPO style), ``False`` none;
      ``None`` (default) averages exactly for ``ipo`` and ``sigmoid_norm``, as TRL 1.x does.
    * ``rpo_alpha``: adds ``rpo_alpha ·`` the mean NLL of the chosen completion tokens (RPO).
    * The loss options are a :class:`~fastalign.ops.DPOLossOptions` (``options=``) or its fields as keywords
      (``beta``, ``loss_type``, ``label_smoothing``, ``discopop_tau``, ``loss_weights``).

    The loss is the mean over pairs. ``metrics`` (detached): ``chosen_rewards`` / ``rejected_rewards`` ``[B]``
    (``β·(logp − ref)`` of summed log-probs), ``reward_accuracy``, ``reward_margin``, ``chosen_logps`` /
    ``rejected_logps`` ``[B]`` and ``nll_loss`` when ``rpo_alpha`` is set.

    Example:
        >>> import torch, fastalign
        >>> loss_fn = fastalign.nn.LinearDPOLoss(beta=0.1)
        >>> hidden, weight = torch.randn(4, 7, 16, requires_grad=True), torch.randn(60, 16)
        >>> targets = torch.randint(0, 60, (4, 7)); targets[:, :3] = -100   # 2 pairs, 3 prompt tokens
        >>> loss, metrics = loss_fn(hidden, weight, targets, ref_hidden=hidden.detach(), ref_weight=weight)
        >>> loss.backward()
    """

    @with_option_fields(DPOLossOptions)
    def __init__(
        self,
        *,
        options: DPOLossOptions | None = None,
        average_log_prob: bool | None = None,
        rpo_alpha: float | None = None,
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: float | None = None,
        gradient_in_forward: bool | None = None,
        backend: str = "auto",
        **option_fields,
    ):
        super().__init__()
        self.options = options_from(DPOLossOptions, options, option_fields, "LinearDPOLoss")
        self.average_log_prob, self.rpo_alpha, self.ignore_index = average_log_prob, rpo_alpha, ignore_index
        self.temperature, self.softcap, self.backend = temperature, softcap, backend
        self.gradient_in_forward = gradient_in_forward

    def _reference(self, targets, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias):
        """``[2B]`` summed reference log-probs, without gradient."""
        pairs = targets.shape[0] // 2
        if ref_hidden is not None or ref_weight is not None:
            if ref_hidden is None or ref_weight is None or ref_chosen_logps is not None:
                raise ValueError(
                    "give the reference as (ref_hidden, ref_weight) or as precomputed ref_*_logps, not both"
                )
            with torch.no_grad():
                ref_logps = linear_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias, **_logprob_options(self))
                return ref_logps.sum(-1)
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(
                "LinearDPOLoss needs a reference: (ref_hidden, ref_weight) or ref_chosen_logps and ref_rejected_logps "
                "(zeros for reference-free SimPO/CPO)"
            )
        for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if not isinstance(value, torch.Tensor) or value.shape != (pairs,):
                raise ValueError(f"{name} must be a [B] = ({pairs},) tensor, got {getattr(value, 'shape', value)}")
        return torch.cat([ref_chosen_logps, ref_rejected_logps]).detach()

    def _pair_loss(self, token_logps, mask, ref_summed, pairs_total, chosen_tokens):
        """Loss of some pairs (their chosen rows, then their rejected rows), normalised by the whole batch."""
        losses, sums, _ = dpo_loss_from_token_logps(
            token_logps,
            mask,
            ref_summed,
            average_log_prob=self.average_log_prob,
            options=self.options,
            backend=self.backend,
        )
        loss = losses.sum() / pairs_total
        if self.rpo_alpha is not None:
            loss = loss - self.rpo_alpha * sums[: token_logps.shape[0] // 2].sum() / chosen_tokens
        return loss

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        *,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.shape[0] % 2:
            raise ValueError(f"targets must be [2B, T] (chosen rows, then rejected rows), got {tuple(targets.shape)}")
        pairs, width = targets.shape[0] // 2, targets.shape[1]
        ref_summed = self._reference(targets, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias)
        mask = targets != self.ignore_index
        pairs_total = max(pairs, 1)
        chosen_tokens = mask[:pairs].sum().clamp_min(1)
        if _fused_gradient(self.gradient_in_forward, hidden, weight, bias):
            flat_mask = mask.reshape(-1)

            def chunk_loss(index: torch.Tensor, s: ChunkStats) -> torch.Tensor:
                in_pairs = index.view(-1, 2, width)
                order = torch.cat([in_pairs[:, 0], in_pairs[:, 1]])  # chosen rows, then rejected rows
                picked = order[:, 0] // width
                token_logps = s.logp.view(-1, 2, width)
                token_logps = torch.cat([token_logps[:, 0], token_logps[:, 1]])
                ref = ref_summed[picked].to(token_logps.dtype)
                return self._pair_loss(token_logps, flat_mask[order], ref, pairs_total, chosen_tokens)

            units = _pair_units(pairs, width, targets.device)
            result = fused_linear_loss(
                hidden, weight, targets, chunk_loss, bias=bias, units=units, **_logprob_options(self)
            )
            loss, sums = result.loss, result.logp.sum(-1)
        else:
            token_logps = linear_logprobs(hidden, weight, targets, bias=bias, **_logprob_options(self))
            loss = self._pair_loss(token_logps, mask, ref_summed.to(token_logps.dtype), pairs_total, chosen_tokens)
            sums = token_logps.detach().sum(-1)
        metrics = _dpo_metrics(self.options.beta, sums, ref_summed.to(sums.dtype), pairs)
        if self.rpo_alpha is not None:
            metrics["nll_loss"] = -sums[:pairs].sum() / chosen_tokens
        return loss, metrics


def _pair_units(pairs: int, width: int, device: torch.device) -> list[torch.Tensor]:
    """The fused loss's units of DPO: pair ``i`` is its chosen row's tokens (row ``i``), then its rejected row's
    (row ``pairs + i``), as indices into the flattened ``[2B, T]``."""
    rows = [torch.arange(row * width, (row + 1) * width) for row in range(2 * pairs)]
    return [torch.cat([rows[i], rows[pairs + i]]).to(device) for i in range(pairs)]


def _logprob_options(module: LinearPolicyLoss | LinearDPOLoss) -> dict:
    """The log-prob op's keywords of a module."""
    options = {"temperature": module.temperature, "softcap": module.softcap, "ignore_index": module.ignore_index}
    return {**options, "backend": module.backend}


def _dpo_metrics(beta: float, summed: torch.Tensor, ref_summed: torch.Tensor, pairs: int) -> dict[str, torch.Tensor]:
    rewards = beta * (summed - ref_summed)
    chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().sum() / max(pairs, 1),
        "reward_margin": (chosen_rewards - rejected_rewards).sum() / max(pairs, 1),
        "chosen_logps": summed[:pairs],
        "rejected_logps": summed[pairs:],
    }
