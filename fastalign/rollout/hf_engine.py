"""Rollouts with Hugging Face ``generate`` on the training model itself (no copy, no weight sync)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from fastalign._padding import pad_rows
from fastalign.models.causal_lm import unwrap_peft
from fastalign.rollout._types import (
    RolloutBatch,
    SamplingParams,
    check_prompts,
    completion_mask_after_eos,
    eos_list,
    left_pad,
)

__all__ = ["HFGenerateEngine"]


class HFGenerateEngine:
    """Sample completions with ``model.generate`` on the model being trained (TRL's non-vLLM GRPO path).

    During :meth:`generate` the model is put in eval mode (dropout off; gradient checkpointing, which only acts in
    training mode, is idle) under ``torch.no_grad()`` with the KV cache on; afterwards every submodule's
    ``training`` flag and ``config.use_cache`` are restored, and the model's ``generation_config`` is never touched
    (an explicit ``GenerationConfig`` is passed). A PEFT ``PeftModel`` is used as is (its ``generate`` runs the
    LoRA layers); configs are read from the model inside it.

    ``sampler_logps`` come from ``generate(output_logits=True)``: the model's *raw* output logits, i.e. what its
    ``forward`` returns — final-logit softcapping (Gemma 2/3) and logit scales (Cohere ``logit_scale``, Granite
    ``logits_scaling``) already applied by the model, and none of generate's processors (repetition penalty,
    temperature, top-k/top-p/min-p) applied. The engine computes ``log_softmax(logits.float() / temperature)``
    at the sampled tokens, which is exactly what :meth:`fastalign.models.CausalLMAdapter.token_logprobs` (softcap
    and logit temperature taken from the same config) returns at that temperature, so ``exp(trainer − sampler)``
    is 1 up to KV-cache numerics. The adapter's settings are therefore not re-applied here (doing so would apply
    the softcap twice). Memory: generate keeps one ``[rows, V]`` float32 tensor per generated step, so a chunk
    costs about ``batch_size * num_generations * C * V * 4`` bytes; bound it with ``batch_size`` or pass
    ``return_logps=False`` (then ``sampler_logps`` is ``None``).

    Args:
        model: a Hugging Face causal LM (or a ``PeftModel`` around one); not an accelerate/DDP wrapper.
        pad_token_id: id used for the left padding of prompts and the right padding of completions.
        eos_token_id: one id or a list of ids that end a completion.
        batch_size: prompts per ``generate`` call (each expands to ``num_generations`` rows); ``None`` = all.
        return_logps: report ``sampler_logps`` (needs ``output_logits``; see the memory note above).

    Reproducibility: ``generate(..., seed=s)`` seeds the global torch RNG (CPU and the model's CUDA device) for
    the call inside ``torch.random.fork_rng``, so the same seed, prompts, params and weights give the same
    completions and the caller's RNG stream is left untouched. Without ``seed`` the global RNG is used (set
    ``torch.manual_seed`` beforehand to reproduce). ``generate`` takes no ``torch.Generator``, hence the seed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int | Sequence[int],
        batch_size: int | None = None,
        return_logps: bool = True,
    ) -> None:
        if not hasattr(model, "generate"):
            raise TypeError(f"{type(model).__name__} has no generate(); pass a Hugging Face causal LM")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_list(eos_token_id)
        self.batch_size = batch_size
        self.return_logps = return_logps

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No-op: the engine samples from the training model itself, so it always sees the current weights."""

    def _generation_config(self, params: SamplingParams, want_logits: bool):
        from transformers import GenerationConfig

        base = unwrap_peft(self.model)
        model_min_p = getattr(getattr(base, "generation_config", None), "min_p", None)
        # Explicit values everywhere: generate fills `None` fields from the model's generation_config (a hub
        # generation_config.json often sets top_k=50, temperature=0.6, ...), which must not leak into the rollout.
        sampling = not params.greedy
        kwargs = {
            "max_new_tokens": params.max_completion_length,
            "do_sample": sampling,
            "temperature": params.temperature if sampling else 1.0,
            "top_p": params.top_p if sampling else 1.0,
            "top_k": (params.top_k or 0) if sampling else 0,
            "repetition_penalty": params.repetition_penalty,
            "num_return_sequences": 1,  # prompts are repeat_interleaved instead (greedy refuses n > 1)
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids,
            "use_cache": True,
            "return_dict_in_generate": True,
            "output_logits": want_logits,
            "disable_compile": True,
        }
        if sampling and params.min_p is not None:
            kwargs["min_p"] = params.min_p
        elif model_min_p is not None:
            kwargs["min_p"] = 0.0  # neutralise the model's own min_p
        return GenerationConfig(**kwargs)

    @contextlib.contextmanager
    def _generation_mode(self) -> Iterator[None]:
        modules = list(self.model.modules())
        training = [m.training for m in modules]
        config = getattr(unwrap_peft(self.model), "config", None)
        use_cache = getattr(config, "use_cache", None)
        self.model.eval()
        try:
            with torch.no_grad():  # not inference_mode: the ids are later inputs of autograd graphs
                yield
        finally:
            for module, flag in zip(modules, training, strict=True):
                module.training = flag
            if config is not None and use_cache is not None:
                config.use_cache = use_cache

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int | None = None) -> RolloutBatch:
        """Sample ``params.num_generations`` completions per prompt.

        Args:
            prompts: ``len = B`` lists of token ids (unpadded, any lengths).
            params: :class:`SamplingParams`.
            seed: optional seed for this call (see the class docstring).

        Returns:
            :class:`RolloutBatch` with ``N = B * num_generations`` rows on the model's device, prompt ``i``'s rows
            contiguous; ``sampler_logps`` is ``None`` for greedy decoding or ``return_logps=False``.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a fastalign.rollout.SamplingParams, got {type(params).__name__}")
        prompts = check_prompts(prompts)
        device = next(self.model.parameters()).device
        want_logps = self.return_logps and not params.greedy
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)  # one P for every chunk
        g = params.num_generations
        prompt_ids = prompt_ids.repeat_interleave(g, dim=0).to(device)
        prompt_mask = prompt_mask.repeat_interleave(g, dim=0).to(device)
        step = (self.batch_size or len(prompts)) * g
        generation_config = self._generation_config(params, want_logps)

        rng_devices = [device] if device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=rng_devices) if seed is not None else contextlib.nullcontext()
        chunks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        with rng, self._generation_mode():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, prompt_ids.shape[0], step):
                ids, mask = prompt_ids[start : start + step], prompt_mask[start : start + step]
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config)
                completion = out.sequences[:, ids.shape[1] :]
                logps = None
                if want_logps:
                    logps = _sampled_logps(out.logits, completion, params.temperature)
                del out
                chunks.append((completion, logps))

        width = max(c.shape[1] for c, _ in chunks)
        completion_ids = torch.cat([pad_rows(c, self.pad_token_id, width) for c, _ in chunks])
        completion_mask, truncated = completion_mask_after_eos(completion_ids, self.eos_token_ids)
        sampler_logps = None
        if want_logps:
            sampler_logps = torch.cat([pad_rows(lp, 0.0, width) for _, lp in chunks])
            sampler_logps = torch.where(completion_mask.bool(), sampler_logps, 0.0)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            truncated=truncated,
            sampler_logps=sampler_logps,
        )


def _sampled_logps(step_logits: Sequence[torch.Tensor], tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[n, C]`` float32 ``log_softmax(logits_t / temperature)[token_t]``, one step at a time (no ``[n, C, V]``)."""
    if len(step_logits) != tokens.shape[1]:
        raise RuntimeError(f"generate returned {len(step_logits)} logit steps for {tokens.shape[1]} new tokens")
    columns = [
        torch.log_softmax(logits.float() / temperature, dim=-1).gather(1, tokens[:, t : t + 1].to(logits.device))
        for t, logits in enumerate(step_logits)
    ]
    return torch.cat(columns, dim=1).to(tokens.device)
