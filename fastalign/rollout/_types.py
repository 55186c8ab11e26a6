"""The rollout contract: sampling settings, the batch an engine returns, and the engine protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch

from fastalign._padding import pad_rows
from fastalign.ops._checks import check_number

__all__ = ["RolloutBatch", "RolloutEngine", "SamplingParams"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How an engine samples completions (the generation settings of TRL's ``GRPOConfig``).

    Attributes:
        num_generations: completions per prompt (``>= 1``); prompt ``i``'s completions are rows
            ``i * num_generations ... (i + 1) * num_generations - 1`` of the :class:`RolloutBatch`.
        max_completion_length: most new tokens per completion (``>= 1``).
        temperature: softmax temperature (``>= 0``); ``0`` means greedy decoding.
        top_p: nucleus-sampling mass in ``(0, 1]``; ``1.0`` disables it.
        top_k: keep the ``k >= 1`` most likely tokens; ``None`` disables it.
        min_p: drop tokens below ``min_p * p_max`` (``[0, 1]``); ``None`` disables it.
        repetition_penalty: CTRL-style penalty (``> 0``); ``1.0`` disables it.

    Raises:
        ValueError / TypeError: naming the offending field.
    """

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_generations", "max_completion_length"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"SamplingParams.{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"SamplingParams.{name} must be >= 1, got {value}")
        check_number("SamplingParams.temperature", self.temperature, at_least=0, why="0 = greedy")
        check_number("SamplingParams.top_p", self.top_p, above=0, at_most=1)
        check_number("SamplingParams.repetition_penalty", self.repetition_penalty, above=0)
        if self.top_k is not None:
            if not _is_int(self.top_k):
                raise TypeError(f"SamplingParams.top_k must be an int or None, got {self.top_k!r}")
            if self.top_k < 1:
                raise ValueError(f"SamplingParams.top_k must be >= 1 or None (no top-k filtering), got {self.top_k}")
        check_number("SamplingParams.min_p", self.min_p, at_least=0, at_most=1, optional=True)

    @property
    def greedy(self) -> bool:
        """``temperature == 0``: deterministic argmax decoding."""
        return self.temperature == 0


@dataclass
class RolloutBatch:
    """Completions sampled for a list of prompts. ``N = len(prompts) * num_generations`` rows; prompt ``i``'s
    generations are the contiguous rows ``i * num_generations : (i + 1) * num_generations``.

    Attributes:
        prompt_ids: ``[N, P]`` int64, LEFT-padded with the engine's pad id (``P`` = longest prompt).
        prompt_mask: ``[N, P]`` int64, 1 on prompt tokens, 0 on the left padding.
        completion_ids: ``[N, C]`` int64, right-padded with the pad id; ``C`` = longest completion
            (``<= max_completion_length``).
        completion_mask: ``[N, C]`` int64, 1 up to and including the first EOS, 0 after it (and on padding).
        truncated: ``[N]`` bool, True where the completion has no EOS within ``max_completion_length``.
        sampler_logps: ``[N, C]`` float32 or ``None``: the engine's log-prob of each sampled token, 0 where
            ``completion_mask`` is 0. For :class:`~fastalign.rollout.HFGenerateEngine` it is
            ``log_softmax(logits / temperature)`` of the model's own output logits, i.e. at ``temperature`` but
            BEFORE the repetition penalty and the top-k / top-p / min-p filtering — the same quantity
            :meth:`fastalign.models.CausalLMAdapter.token_logprobs` computes at that temperature. For
            :class:`~fastalign.rollout.VLLMEngine` it is vLLM's ``processed_logprobs`` (what TRL uses): equal to
            the former when no filter/penalty is active, else the log-prob under the filtered, penalised
            distribution vLLM actually sampled from. ``None`` when the engine cannot report them (greedy
            decoding, or an engine built with ``return_logps=False``). A NaN entry means the engine had no value
            for that token; :func:`~fastalign.rollout.truncated_importance_weights` gives it weight 1.

    The trainer's forward over ``cat([prompt_ids, completion_ids], 1)`` should use
    ``attention_mask = cat([prompt_mask, completion_mask], 1)`` and ``position_ids = (attention_mask.cumsum(1)
    - 1).clamp(min=0)``, the positions the engine generated with under left padding.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    sampler_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> RolloutBatch:
        """The rows ``rows`` (a slice or an index tensor) of every field."""
        return RolloutBatch(**{f.name: _rows_of(getattr(self, f.name), rows) for f in fields(self)})

    @staticmethod
    def concat(batches: Sequence[RolloutBatch], pad_token_id: int) -> RolloutBatch:
        """``batches`` (e.g. from several generate calls: other prompt and completion widths) as one batch, in
        order: prompts left-padded and completions right-padded with ``pad_token_id`` to the widest, masks with
        0; ``sampler_logps`` padded with 0, or ``None`` unless every batch has them."""
        prompt = max(b.prompt_ids.shape[1] for b in batches)
        completion = max(b.completion_ids.shape[1] for b in batches)

        def joined(name: str, value: float, width: int, left: bool = False) -> torch.Tensor:
            return torch.cat([pad_rows(getattr(b, name), value, width, left=left) for b in batches])

        has_logps = all(b.sampler_logps is not None for b in batches)
        return RolloutBatch(
            prompt_ids=joined("prompt_ids", pad_token_id, prompt, left=True),
            prompt_mask=joined("prompt_mask", 0, prompt, left=True),
            completion_ids=joined("completion_ids", pad_token_id, completion),
            completion_mask=joined("completion_mask", 0, completion),
            truncated=torch.cat([b.truncated for b in batches]),
            sampler_logps=joined("sampler_logps", 0.0, completion) if has_logps else None,
        )

    def input_ids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids [N, P + C], attention_mask [N, P + C], position_ids [N, P + C])``, all int64: prompt and
        completion joined, ready for a training forward (the logits of columns ``P - 1 ... P + C - 2`` predict
        the completion)."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return ids, mask, positions


def _rows_of(value: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    if value is None:
        return None
    return value[rows.to(value.device) if isinstance(rows, torch.Tensor) else rows]


@runtime_checkable
class RolloutEngine(Protocol):
    """What the GRPO trainer needs from a sampler."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.num_generations`` completions for each prompt (token ids, no padding)."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (call after each optimizer step)."""
        ...


def check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Validate a batch of token-id prompts: a non-empty list of non-empty int lists."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence) or len(prompt) == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids, got {prompt!r}")
        if not all(_is_int(t) for t in prompt):
            raise TypeError(f"prompts[{i}] must hold ints (token ids)")
        out.append(list(prompt))
    return out


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], mask [B, P])`` int64, LEFT-padded to the longest prompt."""
    length = max(len(p) for p in prompts)
    mask = pad_rows([[1] * len(p) for p in prompts], 0, length, left=True)
    return pad_rows(prompts, pad_token_id, length, left=True), mask


def completion_mask_after_eos(
    completion_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [N, C] int64, truncated [N] bool)``: 1 up to and including the first EOS, and rows without one."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1])
    columns = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (columns.unsqueeze(0) <= first.unsqueeze(1)).long()
    return mask, ~has_eos


def eos_list(eos_token_id: int | Sequence[int]) -> list[int]:
    ids = [eos_token_id] if _is_int(eos_token_id) else list(eos_token_id)
    if not ids or not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError(f"eos_token_id must be a token id or a non-empty list of them, got {eos_token_id!r}")
    return ids
