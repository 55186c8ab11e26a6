"""Rollouts with a colocated vLLM engine (TRL's ``vllm_mode="colocate"``), weights pushed from the trainer.

vLLM is imported only when :class:`VLLMEngine` is constructed, so this module imports without it. Written
against the vLLM range TRL 1.16 supports (0.22 – 0.31, V1 engine): ``LLM(..., logprobs_mode="processed_logprobs",
distributed_executor_backend="external_launcher")`` and
``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights`` for the weight sync, exactly as
TRL's ``VLLMGeneration`` does in colocate mode. Not exercised in fastalign's test suite (no GPU there).
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fastalign.rollout._types import (
    RolloutBatch,
    SamplingParams,
    check_prompts,
    completion_mask_after_eos,
    eos_list,
    left_pad,
)

__all__ = ["VLLMEngine"]

_INSTALL_HINT = 'VLLMEngine needs vLLM (0.22 - 0.31, a CUDA machine): pip install "fastalign[vllm]"'


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMEngine:
    """Sample with ``vllm.LLM.generate`` in the training process; :meth:`sync_weights` pushes the trainer's weights.

    The engine runs in-process (``distributed_executor_backend="external_launcher"``, as TRL's colocate mode):
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` are set to a single-process default when
    unset (under ``torchrun`` they already are). With ``tensor_parallel_size > 1`` every rank of a TP group must call
    :meth:`generate` with the same prompts (TRL all-gathers them first); that gathering is the caller's job.

    ``sampler_logps`` are vLLM's ``processed_logprobs`` of the sampled tokens (``SamplingParams(logprobs=0)``): the
    log-prob after temperature and any penalty / top-k / top-p / min-p processing, i.e. under the distribution vLLM
    actually sampled from. With those filters off this equals ``log_softmax(logits / temperature)``, the trainer's
    quantity; with them on, the ratio also absorbs the filtering (TRL's behaviour). Greedy decoding reports
    ``None``.

    Args:
        model_name_or_path: the checkpoint vLLM loads first (the trainer model's ``name_or_path``).
        gpu_memory_utilization: share of the GPU memory vLLM may take (weights + KV cache); the rest is the
            trainer's.
        tensor_parallel_size: vLLM tensor parallelism.
        max_model_len: longest prompt + completion (``None``: the model's).
        dtype: vLLM weight dtype (``"auto"``, ``"bfloat16"``, ...).
        seed: vLLM's sampling seed (TRL uses ``process_index // tensor_parallel_size``).
        pad_token_id: padding id for the batch (default: the tokenizer's pad, else its EOS).
        eos_token_id: id(s) that end a completion (default: the tokenizer's EOS); passed as ``stop_token_ids``.
        device: where the returned tensors live (default: the current CUDA device, else CPU).
        llm_kwargs: more ``vllm.LLM`` arguments; they override the defaults above (``max_num_seqs``,
            ``enable_prefix_caching``, ``distributed_executor_backend``, ...).

    Raises:
        ImportError: vLLM is not installed (the message says ``pip install "fastalign[vllm]"``).
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        device: torch.device | str | None = None,
        **llm_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if (
            isinstance(tensor_parallel_size, bool)
            or not isinstance(tensor_parallel_size, int)
            or tensor_parallel_size < 1
        ):
            raise ValueError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
        self._vllm = vllm
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        kwargs: dict[str, Any] = {
            "model": model_name_or_path,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "dtype": dtype,
            "seed": seed,
            "distributed_executor_backend": "external_launcher",  # in-process: load_weights can reach the model
            "max_num_batched_tokens": 4096,  # the V1 profiler over-reserves with the 32k default (TRL)
            "logprobs_mode": "processed_logprobs",  # temperature/processing included in the reported logprobs
        }
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        tokenizer = self.llm.get_tokenizer()
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
            if eos_token_id is None:
                raise ValueError("the tokenizer has no eos_token_id; pass eos_token_id=")
        self.eos_token_ids = eos_list(eos_token_id)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = self.eos_token_ids[0] if pad_token_id is None else pad_token_id
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    def _sampling_params(self, params: SamplingParams) -> Any:
        greedy = params.greedy
        return self._vllm.SamplingParams(
            n=params.num_generations,
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=0 if greedy or params.top_k is None else params.top_k,  # 0: no top-k (vLLM and TRL)
            min_p=0.0 if greedy or params.min_p is None else params.min_p,
            repetition_penalty=params.repetition_penalty,
            max_tokens=params.max_completion_length,
            stop_token_ids=list(self.eos_token_ids),
            logprobs=None if greedy else 0,  # 0: only the sampled token's logprob
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.num_generations`` completions per prompt with vLLM (one ``LLM.generate`` call, ``n``
        completions per request, so prompt ``i``'s rows are contiguous). See :class:`RolloutBatch`."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a fastalign.rollout.SamplingParams, got {type(params).__name__}")
        prompts = check_prompts(prompts)
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], sampling_params=self._sampling_params(params), use_tqdm=False
        )
        g = params.num_generations
        rows: list[list[int]] = []
        logps: list[list[float]] = []
        stopped_by_length: list[bool] = []
        for request in outputs:
            if len(request.outputs) != g:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} completions for a prompt, expected {g}")
            for out in request.outputs:
                ids = list(out.token_ids)
                rows.append(ids)
                stopped_by_length.append(getattr(out, "finish_reason", None) == "length")
                if out.logprobs is not None:
                    logps.append([_logprob_of(step, token) for step, token in zip(out.logprobs, ids, strict=False)])
        width = max(1, max(len(r) for r in rows))
        completion_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows])
        for i, r in enumerate(rows):
            completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        eos_mask, no_eos = completion_mask_after_eos(completion_ids, self.eos_token_ids)
        # vLLM may also stop on EOS ids of the model's generation_config that are not in eos_token_ids: its output
        # ends there, so the mask is also cut at the returned length; "truncated" means it ran out of tokens.
        completion_mask = eos_mask * (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
        truncated = no_eos & torch.tensor(stopped_by_length, dtype=torch.bool)
        sampler_logps = None
        if not params.greedy and len(logps) == len(rows):
            sampler_logps = torch.zeros((len(rows), width), dtype=torch.float32)
            for i, lp in enumerate(logps):
                sampler_logps[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
            sampler_logps = torch.where(completion_mask.bool(), sampler_logps, 0.0)
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        device = self.device
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(g, dim=0).to(device),
            prompt_mask=prompt_mask.repeat_interleave(g, dim=0).to(device),
            completion_ids=completion_ids.to(device),
            completion_mask=completion_mask.to(device),
            truncated=truncated.to(device),
            sampler_logps=None if sampler_logps is None else sampler_logps.to(device),
        )

    def _runner_model(self) -> Any:
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as exc:
            raise RuntimeError(
                "cannot reach vLLM's model in this process (llm.llm_engine.model_executor.driver_worker"
                ".model_runner.model): build VLLMEngine with the default distributed_executor_backend="
                "'external_launcher' (or VLLM_ENABLE_V1_MULTIPROCESSING=0) on a vLLM version TRL 1.16 supports"
            ) from exc

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current parameters into the vLLM engine and drop its prefix cache.

        A PEFT model has its adapters merged for the copy and unmerged afterwards; parameter names are mapped to
        the base model's (``base_model.model.`` / ``.base_layer`` / ``modules_to_save.default.`` stripped, LoRA
        tensors and ``original_module`` copies skipped), as TRL does. The model must not be sharded (FSDP /
        ZeRO-3 gathering is not done here).
        """
        runner_model = self._runner_model()
        with torch.no_grad():
            runner_model.load_weights(_named_weights(model))
        self.llm.reset_prefix_cache()


def _logprob_of(step: dict[int, Any], token: int) -> float:
    entry = step.get(token) if step is not None else None
    value = getattr(entry, "logprob", None)
    return float("nan") if value is None or math.isnan(value) else float(value)


def _named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` under the names vLLM's ``load_weights`` expects (tied weights appear once)."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        model.merge_adapter()
        try:
            for name, param in model.named_parameters():
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                if model.prefix in name or "original_module" in name:
                    continue
                yield _vllm_name(name.replace("modules_to_save.default.", "")), param.data
        finally:
            model.unmerge_adapter()
    else:
        for name, param in model.named_parameters():
            yield _vllm_name(name), param.data


def _vllm_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")
