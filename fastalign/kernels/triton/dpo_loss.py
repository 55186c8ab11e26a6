"""Triton kernels of the DPO family from per-token log-probs: one forward launch and one backward launch.

The batch holds ``2B`` rows: pair ``i`` is chosen row ``i`` and rejected row ``B + i``.

* ``dpo_fwd_kernel``: each program takes ``BLOCK_P`` pairs, sums their rows' token log-probs and lengths over T,
  evaluates every requested loss type (summed or length-averaged inputs per type), and writes the per-pair
  weighted loss, the rows' sums and lengths, and each row's ``d loss / d token log-prob`` (one number per row,
  since a row's tokens enter the loss only through their sum).
* ``dpo_bwd_kernel``: broadcasts those per-row gradients, scaled by the upstream gradient, onto the masked tokens.

Loss-type indices follow ``fastalign.ops.preference.DPO_LOSS_TYPES``. ``T_BUCKET`` (the launcher's bucket of T) is
read by the autotuner only: its key, with the constexpr variant flags, so a new T in the bucket reuses the tuning.
"""

import triton
import triton.language as tl

from fastalign.kernels.triton.softmax_tile import autotune_configs

# Kernels may read module globals only when they are constexpr (compiled Triton refuses other globals).
NUM_TYPES = tl.constexpr(12)
SIGMOID, HINGE, IPO, ROBUST, EXO_PAIR, NCA_PAIR, BCO_PAIR, SPPO_HARD, APO_ZERO, APO_DOWN, DISCOPOP, SIGMOID_NORM = (
    tl.constexpr(kind) for kind in range(NUM_TYPES)
)

_FWD_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_P": bp, "BLOCK_T": bt}, num_warps=w)
        for bp, bt, w in [(1, 1024, 4), (4, 512, 4), (8, 256, 8)]
    ],
    triton.Config({"BLOCK_P": 2, "BLOCK_T": 8}),
)
_BWD_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_R": br, "BLOCK_T": bt}, num_warps=w)
        for br, bt, w in [(1, 1024, 4), (4, 1024, 8), (8, 512, 4)]
    ],
    triton.Config({"BLOCK_R": 2, "BLOCK_T": 8}),
)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _log_sigmoid(x):
    # log σ(x) = min(x, 0) − log(1 + e^−|x|): stable for either sign.
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _type_loss_and_grads(c, r, beta, ls, tau, KIND: tl.constexpr):
    """One loss type for chosen / rejected log-ratios ``c``, ``r``: ``(loss, d loss / dc, d loss / dr)``."""
    z = beta * (c - r)
    if KIND == SIGMOID:
        loss = -(1.0 - ls) * _log_sigmoid(z) - ls * _log_sigmoid(-z)
        dz = -(1.0 - ls) * _sigmoid(-z) + ls * _sigmoid(z)
        dc = beta * dz
        dr = -beta * dz
    elif KIND == SIGMOID_NORM:
        loss = -_log_sigmoid(z)
        dz = -_sigmoid(-z)
        dc = beta * dz
        dr = -beta * dz
    elif KIND == HINGE:
        loss = tl.maximum(1.0 - z, 0.0)
        dz = tl.where(1.0 - z > 0.0, -1.0, 0.0)
        dc = beta * dz
        dr = -beta * dz
    elif KIND == IPO:
        gap = c - r - 0.5 / beta
        loss = gap * gap
        dc = 2.0 * gap
        dr = -2.0 * gap
    elif KIND == ROBUST:
        loss = (-(1.0 - ls) * _log_sigmoid(z) + ls * _log_sigmoid(-z)) / (1.0 - 2.0 * ls)
        dz = (-(1.0 - ls) * _sigmoid(-z) - ls * _sigmoid(z)) / (1.0 - 2.0 * ls)
        dc = beta * dz
        dr = -beta * dz
    elif KIND == EXO_PAIR:
        p, q = _sigmoid(z), _sigmoid(-z)
        log_p, log_q = _log_sigmoid(z), _log_sigmoid(-z)
        log_keep, log_smooth = tl.log(1.0 - ls), tl.log(ls)
        loss = p * (log_p - log_keep) + q * (log_q - log_smooth)
        dz = p * q * (log_p - log_keep - log_q + log_smooth)
        dc = beta * dz
        dr = -beta * dz
    elif KIND == NCA_PAIR:
        bc, br = beta * c, beta * r
        loss = -_log_sigmoid(bc) - 0.5 * _log_sigmoid(-bc) - 0.5 * _log_sigmoid(-br)
        dc = beta * (-_sigmoid(-bc) + 0.5 * _sigmoid(bc))
        dr = beta * 0.5 * _sigmoid(br)
    elif KIND == BCO_PAIR:
        bc, br = beta * c, beta * r
        loss = -_log_sigmoid(bc) - _log_sigmoid(-br)
        dc = -beta * _sigmoid(-bc)
        dr = beta * _sigmoid(br)
    elif KIND == SPPO_HARD:
        a, b = c - 0.5 / beta, r + 0.5 / beta
        loss = a * a + b * b
        dc = 2.0 * a
        dr = 2.0 * b
    elif KIND == APO_ZERO:
        sc, sr = _sigmoid(beta * c), _sigmoid(beta * r)
        loss = 1.0 - sc + sr
        dc = -beta * sc * (1.0 - sc)
        dr = beta * sr * (1.0 - sr)
    elif KIND == APO_DOWN:
        sc, sz = _sigmoid(beta * c), _sigmoid(z)
        loss = sc + 1.0 - sz
        dc = beta * sc * (1.0 - sc) - beta * sz * (1.0 - sz)
        dr = beta * sz * (1.0 - sz)
    else:  # DISCOPOP
        m = _sigmoid(z / tau)
        dm = m * (1.0 - m) / tau
        neg_z = -z
        e = tl.exp(tl.minimum(neg_z, 80.0))
        log_p = _log_sigmoid(z)
        loss = -log_p * (1.0 - m) + e * m
        dz = -_sigmoid(-z) * (1.0 - m) + log_p * dm + tl.where(neg_z <= 80.0, -e * m, 0.0) + e * dm
        dc = beta * dz
        dr = -beta * dz
    return loss, dc, dr


@triton.jit
def _row_sums(token_ptr, mask_ptr, rows, row_ok, T, stride_row, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Σ_t token log-prob and Σ_t mask of ``BLOCK`` rows (float32)."""
    offs = tl.arange(0, BLOCK_T)
    total = tl.zeros((BLOCK, BLOCK_T), tl.float32)
    count = tl.zeros((BLOCK, BLOCK_T), tl.float32)
    for base in range(0, T, BLOCK_T):
        cols = base + offs
        inside = row_ok[:, None] & (cols[None, :] < T)
        index = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
        keep = (tl.load(mask_ptr + index, mask=inside, other=0) != 0) & inside
        total += tl.where(keep, tl.load(token_ptr + index, mask=keep, other=0.0).to(tl.float32), 0.0)
        count += keep.to(tl.float32)
    return tl.sum(total, 1), tl.sum(count, 1)


@triton.autotune(configs=_FWD_CONFIGS, key=["T_BUCKET", "TYPES", "AVERAGED"])
@triton.jit
def dpo_fwd_kernel(
    token_ptr,
    mask_ptr,
    ref_ptr,
    weights_ptr,
    losses_ptr,
    sums_ptr,
    lengths_ptr,
    row_grad_ptr,
    B,
    T,
    T_BUCKET,
    stride_row,
    beta,
    label_smoothing,
    tau,
    TYPES: tl.constexpr,
    AVERAGED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``TYPES`` / ``AVERAGED``: bit ``k`` set when loss type ``k`` is used / takes length-averaged log-probs.

    ``ref_ptr``: ``[2B]`` summed reference log-probs; ``weights_ptr``: ``[NUM_TYPES]`` float32 weights.
    Outputs: ``losses[B]``, ``sums[2B]``, ``lengths[2B]``, ``row_grad[2B]`` (all float32).
    """
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pairs < B
    chosen_sum, chosen_len = _row_sums(token_ptr, mask_ptr, pairs, ok, T, stride_row, BLOCK_P, BLOCK_T)
    rejected_sum, rejected_len = _row_sums(token_ptr, mask_ptr, pairs + B, ok, T, stride_row, BLOCK_P, BLOCK_T)
    ref_chosen = tl.load(ref_ptr + pairs, mask=ok, other=0.0).to(tl.float32)
    ref_rejected = tl.load(ref_ptr + B + pairs, mask=ok, other=0.0).to(tl.float32)
    chosen_scale = 1.0 / tl.maximum(chosen_len, 1.0)
    rejected_scale = 1.0 / tl.maximum(rejected_len, 1.0)
    total = tl.zeros((BLOCK_P,), tl.float32)
    chosen_grad = tl.zeros((BLOCK_P,), tl.float32)
    rejected_grad = tl.zeros((BLOCK_P,), tl.float32)
    for kind in tl.static_range(NUM_TYPES):
        if (TYPES >> kind) & 1:
            weight = tl.load(weights_ptr + kind)
            if (AVERAGED >> kind) & 1:
                c = (chosen_sum - ref_chosen) * chosen_scale
                r = (rejected_sum - ref_rejected) * rejected_scale
                scale_c, scale_r = chosen_scale, rejected_scale
            else:
                c = chosen_sum - ref_chosen
                r = rejected_sum - ref_rejected
                scale_c, scale_r = 1.0, 1.0
            loss, dc, dr = _type_loss_and_grads(c, r, beta, label_smoothing, tau, kind)
            total += weight * loss
            chosen_grad += weight * dc * scale_c
            rejected_grad += weight * dr * scale_r
    tl.store(losses_ptr + pairs, total, mask=ok)
    tl.store(sums_ptr + pairs, chosen_sum, mask=ok)
    tl.store(sums_ptr + B + pairs, rejected_sum, mask=ok)
    tl.store(lengths_ptr + pairs, chosen_len, mask=ok)
    tl.store(lengths_ptr + B + pairs, rejected_len, mask=ok)
    tl.store(row_grad_ptr + pairs, chosen_grad, mask=ok)
    tl.store(row_grad_ptr + B + pairs, rejected_grad, mask=ok)


@triton.autotune(configs=_BWD_CONFIGS, key=["T_BUCKET"])
@triton.jit
def dpo_bwd_kernel(
    mask_ptr, row_grad_ptr, grad_ptr, R, T, T_BUCKET, stride_row, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr
):
    """``grad[R, T] = row_grad[R]`` on masked tokens, 0 elsewhere (``row_grad`` already holds the upstream)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = (rows[:, None] < R) & (cols[None, :] < T)
    index = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    keep = tl.load(mask_ptr + index, mask=inside, other=0) != 0
    row_grad = tl.load(row_grad_ptr + rows, mask=rows < R, other=0.0)
    grad = tl.where(keep, row_grad[:, None], 0.0)
    tl.store(grad_ptr + index, grad.to(grad_ptr.dtype.element_ty), mask=inside)
