"""Argument checks shared by the public ops.

Every failure is a ``ValueError`` that names the argument and says what was expected. Value checks on
``targets`` need the values on the host, so they run for CPU tensors always and for GPU tensors only when
``FASTALIGN_CHECK_TARGETS=1`` (a host sync). Without it, out-of-range targets on a GPU give NaN at those
positions instead of reading out of bounds.
"""

from __future__ import annotations

import math
import os

import torch

SUPPORTED_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")


def _bound(value: float) -> str:
    return f"{value:g}"


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    finite: bool = True,
    integer: bool = False,
    optional: bool = False,
    why: str | None = None,
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a real number inside the bounds given.

    A number is an ``int`` or ``float`` (never a ``bool``, never NaN); ``integer=True`` asks for an ``int``,
    ``finite=False`` lets ±inf through, ``optional=True`` lets ``None`` through. ``above`` / ``at_least`` and
    ``below`` / ``at_most`` are the open / closed bounds. The message says what was expected, in these words:
    ``"{name} must be [None or ]a [finite ]number|an int[ > a| >= a| in [a, b)...][ (why)], got {value!r}"``.
    """
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok and not integer:
        ok = math.isfinite(value) if finite else not math.isnan(value)
    lower = above if above is not None else at_least
    upper = below if below is not None else at_most
    if ok:
        ok = (above is None or value > above) and (at_least is None or value >= at_least)
        ok = ok and (below is None or value < below) and (at_most is None or value <= at_most)
    if ok:
        return
    if lower is not None and upper is not None:
        opening, closing = "(" if above is not None else "[", ")" if below is not None else "]"
        bounds = f" in {opening}{_bound(lower)}, {_bound(upper)}{closing}"
    elif lower is not None:
        bounds = f" {'>' if above is not None else '>='} {_bound(lower)}"
    elif upper is not None:
        bounds = f" {'<' if below is not None else '<='} {_bound(upper)}"
    else:
        bounds = ""
    kind = "an int" if integer else "a finite number" if finite else "a number"
    reason = f" ({why})" if why else ""
    raise ValueError(f"{name} must be {'None or ' if optional else ''}{kind}{bounds}{reason}, got {value!r}")


def check_scalar_options(temperature: float, softcap: float | None, ignore_index: int) -> None:
    check_number("temperature", temperature, above=0)
    check_number("softcap", softcap, above=0, optional=True)
    check_number("ignore_index", ignore_index, integer=True)


def check_targets(targets: object, expected_shape: torch.Size, device: torch.device) -> torch.Tensor:
    targets = _check_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.shape != expected_shape:
        raise ValueError(
            f"targets must have shape {tuple(expected_shape)} (the leading shape of the input), "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the inputs are on {device}")
    return targets


def target_values_checked(device: torch.device) -> bool:
    """Whether checks that need target values (or other ranks' shard bounds) on the host run: always for CPU
    tensors, for GPU tensors only with ``FASTALIGN_CHECK_TARGETS=1``."""
    return device.type == "cpu" or os.environ.get("FASTALIGN_CHECK_TARGETS", "0") == "1"


def check_target_values(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise if a target is outside ``[0, vocab_size)`` and is not ``ignore_index``.

    Runs on CPU tensors, and on GPU tensors when ``FASTALIGN_CHECK_TARGETS=1``.
    """
    if targets.numel() == 0 or not target_values_checked(targets.device):
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        count = int(bad.sum())
        raise ValueError(
            f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {first} at {count} position{'' if count == 1 else 's'}"
        )


def check_linear_inputs(
    hidden: object, weight: object, bias: object, targets: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Check ``hidden [..., D]``, ``weight [V, D]``, ``bias [V] | None`` and ``targets [...]``."""
    hidden = _check_tensor("hidden", hidden)
    weight = _check_tensor("weight", weight)
    _check_float_dtype("hidden", hidden)
    _check_float_dtype("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row: [V, D] with V >= 1, got V = 0")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's width D ({weight.shape[1]}); "
            f"weight is [V, D] = {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        bias = _check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) = [V], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    targets = check_targets(targets, hidden.shape[:-1], hidden.device)
    return hidden, weight, bias, targets


def shares_memory_within(tensor: torch.Tensor) -> bool:
    """Whether two elements of a 2-D ``tensor`` lie at one address: exact, from its sizes and strides (no sync).

    Elements ``(i, j)`` sit at ``i·s + j·t``; with both sizes ``a, b > 1`` and strides ``s, t > 0`` two of them
    coincide iff ``(t / g) < a`` and ``(s / g) < b`` for ``g = gcd(s, t)``; a stride of 0 over a size > 1 always
    overlaps. (torch itself detects only the stride-0 case, not an ``as_strided`` view whose rows overlap.)
    """
    dims = [(size, stride) for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size > 1]
    if tensor.numel() == 0 or not dims:
        return False
    if any(stride == 0 for _, stride in dims):
        return True
    if len(dims) == 1:
        return False
    (a, s), (b, t) = dims
    g = math.gcd(s, t)
    return t // g < a and s // g < b


def check_inplace_target(name: str, tensor: torch.Tensor) -> None:
    """Refuse a 2-D ``tensor`` that a kernel will overwrite in place while two of its elements share memory."""
    if shares_memory_within(tensor):
        raise ValueError(
            f"{name} must not have elements that share memory when its gradient is written in place "
            f"(inplace_backward=True): some elements of {name} (as {tuple(tensor.shape)} with strides "
            f"{tensor.stride()}) refer to a single memory location, so one row's gradient would overwrite values "
            f"another row still reads; pass {name}.contiguous() or inplace_backward=False"
        )


def check_logits_inputs(logits: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``logits [..., V]`` and ``targets [...]``."""
    logits = _check_tensor("logits", logits)
    _check_float_dtype("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension [..., V], got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {tuple(logits.shape)}")
    targets = check_targets(targets, logits.shape[:-1], logits.device)
    return logits, targets
