"""Padding rows to one width: the one helper that data/ (collators), rollout/ (engines) and trainers/ (batches
joined from several rollouts) share. Depends on torch only, so every layer may import it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(
    rows: torch.Tensor | Sequence[Sequence[int]], value: float, width: int, *, left: bool = False
) -> torch.Tensor:
    """``rows`` padded with ``value`` to ``width`` columns, on the right (or the ``left``).

    Args:
        rows: a ``[B, w]`` tensor with ``w <= width`` (its dtype and device are kept; returned as is when
            ``w == width``), or ``B`` lists of token ids of any lengths ``<= width`` (an int64 ``[B, width]`` CPU
            tensor is built).
        value: the padding value (a pad token id, 0 for masks, -100 for labels, 0.0 for log-probs).
        width: the columns of the result.
    """
    if isinstance(rows, torch.Tensor):
        missing = width - rows.shape[1]
        if missing == 0:
            return rows
        pad = rows.new_full((rows.shape[0], missing), value)
        return torch.cat([pad, rows] if left else [rows, pad], dim=1)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            row = torch.as_tensor(row, dtype=torch.long)
            if left:
                out[i, width - len(row) :] = row
            else:
                out[i, : len(row)] = row
    return out
