"""Triton kernels of the PPO / GRPO policy loss: one program per sequence, walking its tokens in blocks.

* ``policy_loss_fwd_kernel`` writes per-row sums ``[8, B]`` (masked loss, token count, clip counts, ratio, KL,
  entropy); the host reduces them over B into the loss and the metrics.
* ``policy_loss_bwd_kernel`` writes ``d_logp`` (and ``d_entropy``) from each row's weight in the aggregation.

Token-level ratios are per token; at sequence level (GSPO) a first pass forms the row's mean log-ratio and the
backward spreads ``d loss / d ratio`` back over the row's tokens. Advantages and importance weights come with a
token stride of 0 when they are per sequence. ``T_BUCKET`` is read by the autotuner only (its key, with the
variant flags). No autograd, no checks: ``fastalign.ops._policy_kernels`` owns both.
"""

import triton
import triton.language as tl

from fastalign.kernels.triton.softmax_tile import autotune_configs

_CONFIGS = autotune_configs(
    [triton.Config({"BLOCK_T": bt}, num_warps=w) for bt, w in [(256, 2), (512, 4), (1024, 4), (2048, 8)]],
    triton.Config({"BLOCK_T": 4}),
)
# What decides the best config: the row length, bucketed by the launcher (``T_BUCKET``: a GRPO batch's T changes
# every step and would re-tune each time), and every variant flag (each compiles to a different kernel).
_TUNING_KEY = ["T_BUCKET", "SEQUENCE", "HAS_REF", "HAS_ENTROPY", "HAS_IS", "DUAL", "KL_KIND", "OBJECTIVE", "BIAS_KL"]


@triton.jit
def _kl_value(log_ratio_ref, KL_KIND: tl.constexpr):
    """k1 / k2 / k3 of ``r = ref − logp`` (already clamped)."""
    if KL_KIND == 1:
        value = -log_ratio_ref
    elif KL_KIND == 2:
        value = 0.5 * log_ratio_ref * log_ratio_ref
    else:
        value = tl.exp(log_ratio_ref) - log_ratio_ref - 1.0
    return value


@triton.jit
def _kl_grad(log_ratio_ref, inside, KL_KIND: tl.constexpr):
    """d KL / d logp (``dr/dlogp = −1``; zero where the clamp of r binds)."""
    if KL_KIND == 1:
        grad = tl.full(log_ratio_ref.shape, 1.0, tl.float32)
    elif KL_KIND == 2:
        grad = -log_ratio_ref
    else:
        grad = 1.0 - tl.exp(log_ratio_ref)
    return tl.where(inside, grad, 0.0)


@triton.jit
def _clamp(x, LIMIT):
    return tl.minimum(tl.maximum(x, -LIMIT), LIMIT)


@triton.jit
def _row_tokens(base, offs, row, T, logp_ptr, old_ptr, mask_ptr, stride_row):
    """One block of a row: positions, flat index, keep (in the row and masked in), logp and old_logp (float32)."""
    cols = base + offs
    inside = cols < T
    index = row * stride_row + cols
    keep = (tl.load(mask_ptr + index, mask=inside, other=0.0) != 0) & inside
    logp = tl.load(logp_ptr + index, mask=keep, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + index, mask=keep, other=0.0).to(tl.float32)
    return cols, index, keep, logp, old


@triton.jit
def _row_values(ptr, row, cols, keep, stride_row, stride_t):
    """A float32 input at one block of a row: per token, or per sequence with ``stride_t`` 0."""
    return tl.load(ptr + row * stride_row + cols * stride_t, mask=keep, other=0.0).to(tl.float32)


@triton.jit
def _sequence_log_ratio(row, T, logp_ptr, old_ptr, mask_ptr, stride_row, BLOCK_T: tl.constexpr):
    """Masked mean of ``logp − old_logp`` over the row (unclamped) and the row's token count."""
    offs = tl.arange(0, BLOCK_T)
    total = tl.zeros((BLOCK_T,), tl.float32)
    count = tl.zeros((BLOCK_T,), tl.float32)
    for base in range(0, T, BLOCK_T):
        _, _, keep, logp, old = _row_tokens(base, offs, row, T, logp_ptr, old_ptr, mask_ptr, stride_row)
        total += tl.where(keep, logp - old, 0.0)
        count += keep.to(tl.float32)
    n = tl.sum(count, 0)
    return tl.sum(total, 0) / tl.maximum(n, 1.0), n


@triton.jit
def _objective_loss(
    ratio, logp, adv, clip_low, clip_high, delta, sapo_temperature_pos, sapo_temperature_neg, OBJECTIVE: tl.constexpr
):
    """One token's objective before the dual clip: 0 the clipped surrogate (its unclipped ratio capped at
    ``delta``, +inf when off), 1 cispo ``−min(ratio, clip_high)·A·logp`` (``clip_high`` is cispo's cap), 2 sapo
    ``−(4/τ) σ(τ (ratio − 1))·A``, 3 ``−A·logp`` (vespo: its weight φ comes in as the importance weight)."""
    if OBJECTIVE == 0:
        clipped_ratio = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        loss = tl.maximum(-adv * tl.minimum(ratio, delta), -adv * clipped_ratio)
    elif OBJECTIVE == 1:
        loss = -tl.minimum(ratio, clip_high) * adv * logp
    elif OBJECTIVE == 2:
        temperature = tl.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        loss = -(tl.sigmoid(temperature * (ratio - 1.0)) * 4.0 / temperature) * adv
    else:
        loss = -adv * logp
    return loss


@triton.autotune(configs=_CONFIGS, key=_TUNING_KEY)
@triton.jit
def policy_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    entropy_ptr,
    adv_ptr,
    mask_ptr,
    is_ptr,
    stats_ptr,
    B,
    T,
    T_BUCKET,
    stride_row,
    stride_adv_row,
    stride_adv_t,
    stride_is_row,
    stride_is_t,
    clip_low,
    clip_high,
    dual_clip,
    delta,
    sapo_temperature_pos,
    sapo_temperature_neg,
    kl_coef,
    entropy_coef,
    LIMIT,
    SEQUENCE: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_IS: tl.constexpr,
    DUAL: tl.constexpr,
    KL_KIND: tl.constexpr,
    OBJECTIVE: tl.constexpr,
    BIAS_KL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per-row sums into ``stats[8, B]`` (float32): loss·mask, mask, and the metric numerators."""
    row = tl.program_id(0).to(tl.int64)  # row * stride_row passes 2^31 on big batches
    offs = tl.arange(0, BLOCK_T)
    seq_ratio = 1.0
    if SEQUENCE:
        seq_log_ratio, _ = _sequence_log_ratio(row, T, logp_ptr, old_ptr, mask_ptr, stride_row, BLOCK_T)
        seq_ratio = tl.exp(_clamp(seq_log_ratio, LIMIT))
    acc_loss = tl.zeros((BLOCK_T,), tl.float32)
    acc_count = tl.zeros((BLOCK_T,), tl.float32)
    acc_low = tl.zeros((BLOCK_T,), tl.float32)
    acc_high = tl.zeros((BLOCK_T,), tl.float32)
    acc_dual = tl.zeros((BLOCK_T,), tl.float32)
    acc_ratio = tl.zeros((BLOCK_T,), tl.float32)
    acc_kl = tl.zeros((BLOCK_T,), tl.float32)
    acc_entropy = tl.zeros((BLOCK_T,), tl.float32)
    for base in range(0, T, BLOCK_T):
        cols, index, keep, logp, old = _row_tokens(base, offs, row, T, logp_ptr, old_ptr, mask_ptr, stride_row)
        adv = _row_values(adv_ptr, row, cols, keep, stride_adv_row, stride_adv_t)
        ratio = tl.zeros((BLOCK_T,), tl.float32) + seq_ratio if SEQUENCE else tl.exp(_clamp(logp - old, LIMIT))
        clipped_loss = _objective_loss(
            ratio, logp, adv, clip_low, clip_high, delta, sapo_temperature_pos, sapo_temperature_neg, OBJECTIVE
        )
        loss = clipped_loss
        if DUAL:
            loss = tl.where(adv < 0, tl.minimum(clipped_loss, -adv * dual_clip), clipped_loss)
            acc_dual += tl.where(keep & (adv < 0) & (clipped_loss > -adv * dual_clip), 1.0, 0.0)
        if HAS_IS:
            loss = loss * _row_values(is_ptr, row, cols, keep, stride_is_row, stride_is_t)
        if HAS_REF:
            ref = tl.load(ref_ptr + index, mask=keep, other=0.0).to(tl.float32)
            kl = _kl_value(_clamp(ref - logp, LIMIT), KL_KIND)
            if BIAS_KL:  # DeepSeek-V3.2's unbiased KL: times the (token or sequence) ratio
                kl = kl * ratio
            loss += kl_coef * kl
            acc_kl += tl.where(keep, kl, 0.0)
        if HAS_ENTROPY:
            entropy = tl.load(entropy_ptr + index, mask=keep, other=0.0).to(tl.float32)
            loss -= entropy_coef * entropy
            acc_entropy += tl.where(keep, entropy, 0.0)
        acc_loss += tl.where(keep, loss, 0.0)
        acc_count += keep.to(tl.float32)
        acc_low += tl.where(keep & (ratio < clip_low) & (adv < 0), 1.0, 0.0)
        acc_high += tl.where(keep & (ratio > clip_high) & (adv > 0), 1.0, 0.0)
        acc_ratio += tl.where(keep, ratio, 0.0)
    # Rows 0..7 are fastalign.ops._policy_math's stats layout (LOSS, COUNT, LOW_CLIP, HIGH_CLIP, DUAL_CLIP, RATIO,
    # KL, ENTROPY), spelled there once; test_policy_metrics fails if a row moves.
    tl.store(stats_ptr + 0 * B + row, tl.sum(acc_loss, 0))
    tl.store(stats_ptr + 1 * B + row, tl.sum(acc_count, 0))
    tl.store(stats_ptr + 2 * B + row, tl.sum(acc_low, 0))
    tl.store(stats_ptr + 3 * B + row, tl.sum(acc_high, 0))
    tl.store(stats_ptr + 4 * B + row, tl.sum(acc_dual, 0))
    tl.store(stats_ptr + 5 * B + row, tl.sum(acc_ratio, 0))
    tl.store(stats_ptr + 6 * B + row, tl.sum(acc_kl, 0))
    tl.store(stats_ptr + 7 * B + row, tl.sum(acc_entropy, 0))


@triton.jit
def _clip_grad(ratio, adv, clip_low, clip_high, dual_clip, delta, DUAL: tl.constexpr):
    """d (clipped, dual-clipped) loss / d ratio for one token, matching torch's max/min/clamp gradients."""
    clipped_ratio = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    unclipped = -adv * tl.minimum(ratio, delta)
    clipped = -adv * clipped_ratio
    # Each branch's slope: -A where its clamp does not bind (bounds included, as torch.clamp's gradient). The max
    # sends the gradient to the larger branch, half to each on a tie (inside the clip range, without delta, both
    # branches are -A·ratio: slope -A).
    unclipped_slope = tl.where(ratio <= delta, -adv, 0.0)
    clipped_slope = tl.where((ratio >= clip_low) & (ratio <= clip_high), -adv, 0.0)
    grad = tl.where(
        unclipped > clipped,
        unclipped_slope,
        tl.where(clipped > unclipped, clipped_slope, 0.5 * (unclipped_slope + clipped_slope)),
    )
    if DUAL:
        clipped_loss = tl.maximum(unclipped, clipped)
        cap = -adv * dual_clip
        dual_scale = tl.where(clipped_loss < cap, 1.0, tl.where(clipped_loss == cap, 0.5, 0.0))
        grad = tl.where(adv < 0, grad * dual_scale, grad)
    return grad


@triton.autotune(configs=_CONFIGS, key=_TUNING_KEY)
@triton.jit
def policy_loss_bwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    is_ptr,
    row_weight_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    B,
    T,
    T_BUCKET,
    stride_row,
    stride_adv_row,
    stride_adv_t,
    stride_is_row,
    stride_is_t,
    clip_low,
    clip_high,
    dual_clip,
    delta,
    sapo_temperature_pos,
    sapo_temperature_neg,
    kl_coef,
    entropy_coef,
    LIMIT,
    SEQUENCE: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_IS: tl.constexpr,
    DUAL: tl.constexpr,
    KL_KIND: tl.constexpr,
    OBJECTIVE: tl.constexpr,
    BIAS_KL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``grad_logp[B, T]`` (and ``grad_entropy``) = row weight × d(row's masked loss sum) / d input."""
    row = tl.program_id(0).to(tl.int64)  # row * stride_row passes 2^31 on big batches
    offs = tl.arange(0, BLOCK_T)
    weight = tl.load(row_weight_ptr + row)
    spread = 0.0
    seq_ratio = 1.0
    if SEQUENCE:
        seq_log_ratio, n = _sequence_log_ratio(row, T, logp_ptr, old_ptr, mask_ptr, stride_row, BLOCK_T)
        seq_inside = (seq_log_ratio >= -LIMIT) & (seq_log_ratio <= LIMIT)
        seq_ratio = tl.exp(_clamp(seq_log_ratio, LIMIT))
        # d(row sum)/d ratio, then through ratio = exp(mean log-ratio) onto each masked token: × ratio / n.
        acc = tl.zeros((BLOCK_T,), tl.float32)
        for base in range(0, T, BLOCK_T):
            cols, index, keep, logp, old = _row_tokens(base, offs, row, T, logp_ptr, old_ptr, mask_ptr, stride_row)
            adv = _row_values(adv_ptr, row, cols, keep, stride_adv_row, stride_adv_t)
            ratio = tl.zeros((BLOCK_T,), tl.float32) + seq_ratio
            token_grad = _clip_grad(ratio, adv, clip_low, clip_high, dual_clip, delta, DUAL)
            if HAS_IS:
                token_grad *= _row_values(is_ptr, row, cols, keep, stride_is_row, stride_is_t)
            if BIAS_KL:  # the KL term is KL · ratio: its share of d(row sum) / d ratio
                ref = tl.load(ref_ptr + index, mask=keep, other=0.0).to(tl.float32)
                token_grad += kl_coef * _kl_value(_clamp(ref - logp, LIMIT), KL_KIND)
            acc += tl.where(keep, token_grad, 0.0)
        spread = tl.where(seq_inside, tl.sum(acc, 0) * seq_ratio / tl.maximum(n, 1.0), 0.0)
    for base in range(0, T, BLOCK_T):
        cols, index, keep, logp, old = _row_tokens(base, offs, row, T, logp_ptr, old_ptr, mask_ptr, stride_row)
        adv = _row_values(adv_ptr, row, cols, keep, stride_adv_row, stride_adv_t)
        inside = cols < T
        if SEQUENCE:
            grad = tl.zeros((BLOCK_T,), tl.float32) + spread
        else:
            log_ratio = logp - old
            ratio = tl.exp(_clamp(log_ratio, LIMIT))
            # d loss / d logp: through the ratio (× ratio, 0 where the clamp of the log-ratio binds), or, for
            # cispo / vespo (a detached weight times logp), the weight itself.
            through_ratio = (log_ratio >= -LIMIT) & (log_ratio <= LIMIT)
            if OBJECTIVE == 0:
                grad = tl.where(
                    through_ratio, _clip_grad(ratio, adv, clip_low, clip_high, dual_clip, delta, DUAL) * ratio, 0.0
                )
            elif OBJECTIVE == 1:
                grad = -tl.minimum(ratio, clip_high) * adv
            elif OBJECTIVE == 2:
                gate = tl.sigmoid(tl.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg) * (ratio - 1.0))
                grad = tl.where(through_ratio, -4.0 * gate * (1.0 - gate) * adv * ratio, 0.0)
            else:
                grad = -adv
            if HAS_IS:
                grad *= _row_values(is_ptr, row, cols, keep, stride_is_row, stride_is_t)
        if HAS_REF:
            ref = tl.load(ref_ptr + index, mask=keep, other=0.0).to(tl.float32)
            r = ref - logp
            kl_slope = _kl_grad(_clamp(r, LIMIT), (r >= -LIMIT) & (r <= LIMIT), KL_KIND)
            if not BIAS_KL:
                grad += kl_coef * kl_slope
            elif SEQUENCE:  # the ratio's own share came with the spread
                grad += kl_coef * kl_slope * seq_ratio
            else:  # d(KL r)/dlogp = KL' r + KL dr/dlogp, dr/dlogp = r inside the clamp
                log_ratio = logp - old
                ratio = tl.exp(_clamp(log_ratio, LIMIT))
                inside_clamp = (log_ratio >= -LIMIT) & (log_ratio <= LIMIT)
                kl = _kl_value(_clamp(r, LIMIT), KL_KIND)
                grad += kl_coef * (kl_slope * ratio + tl.where(inside_clamp, kl * ratio, 0.0))
        grad = tl.where(keep, grad * weight, 0.0)
        tl.store(grad_logp_ptr + index, grad.to(grad_logp_ptr.dtype.element_ty), mask=inside)
        if HAS_ENTROPY:
            grad_entropy = tl.where(keep, -entropy_coef * weight, 0.0)
            tl.store(grad_entropy_ptr + index, grad_entropy.to(grad_entropy_ptr.dtype.element_ty), mask=inside)
