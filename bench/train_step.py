"""``python -m bench.train_step`` (or ``python -m bench train-step``): time and peak memory of one SFT or DPO training
step on a Qwen2.5-0.5B-shaped random-init model: fastalign's trainers, the same step with eager losses (full
logits), and TRL's trainers when installed.

Examples:
    python -m bench.train_step                                  # preset cpu (gpu on a CUDA machine)
    python -m bench.train_step --preset gpu --batch-size 8      # the H100 targets, 8 rows (SFT) / 8 pairs (DPO)
    python -m bench.train_step --preset tiny --out /tmp/bench   # toy model and sequence: seconds
    python -m bench.train_step --stages sft --impls fastalign eager
    python -m bench.train_step --stages grpo grpo-gen ppo        # the RL steps: train_step-rl-<preset>.{md,csv}

A step is ``zero_grad``, the loss forward, backward and ``AdamW.step``. Each case (stage x implementation)
starts from the same seeded random-init model and batch. Before the measured step a short warm-up step (16
tokens per row; plus one full-size step on CUDA, for kernel autotuning) allocates the optimizer state, so the
memory figures are the step's own: its peak above the model and the optimizer state, with the parameter
gradients (the same for every implementation) included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.cases import (
    DPO_BETA,
    DTYPES,
    IGNORE_INDEX,
    eager_clipped_surrogate,
    eager_dpo_loss,
    eager_logprobs_from_logits,
)
from bench.measure import peak_rss, rss_baseline, run_in_fresh_process
from bench.report import checklist, environment, header, markdown_table, package_version, relative_to, write_tables

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("sft", "dpo", "grpo", "grpo-gen", "ppo")
RL_STAGES = ("grpo", "grpo-gen", "ppo")
DEFAULT_STAGES = ("sft", "dpo")  # the RL stages: --stages grpo grpo-gen ppo (their own report, train_step-rl-*)
# (tokens/s vs TRL at least, step peak memory vs TRL at most): the H100 targets per stage
TARGETS = {"sft": (1.3, 0.6), "dpo": (1.3, 0.6), "grpo": (1.5, 0.5), "grpo-gen": (1.5, 0.5), "ppo": (1.5, 0.5)}
IMPLS = ("fastalign", "eager", "trl")
WARMUP_TOKENS = 16  # tokens per row of the warm-up step that allocates the optimizer state


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Qwen2 causal LM's shape (tied embeddings, random init); the fields but ``name`` are Qwen2Config's."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1e6


QWEN2_5_0_5B = ModelShape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936)
TOY = ModelShape("toy Qwen2", 32, 2, 4, 2, 64, 512)
MODELS = {shape.name: shape for shape in (QWEN2_5_0_5B, TOY)}


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    device: str
    dtype: str
    model: ModelShape
    seq_len: int
    batch_size: int  # SFT rows; DPO pairs (2 rows each)
    steps: int  # timed steps after the memory step (0: the memory step's time is the time)
    isolate: bool  # each case in a fresh process (clean peak RSS, no state shared between cases)
    # RL stages: prompts = batch_size; rows = prompts x num_generations
    num_generations: int = 8
    completion_len: int = 1024  # grpo, ppo
    gen_completion_len: int = 1024  # grpo-gen (generated tokens)
    prompt_len: int = 128


# A table, a preset a row (`fmt: skip` keeps it one): description, device, dtype; model, T, batch, timed steps,
# isolate; the RL stages' shapes.
PRESETS = {
    "cpu": Preset("Qwen2.5-0.5B shape at 2048 tokens on CPU", "cpu", "float32",
                  QWEN2_5_0_5B, 2048, 1, 0, True,
                  num_generations=4, completion_len=256, gen_completion_len=32, prompt_len=64),
    "gpu": Preset("the H100 targets: Qwen2.5-0.5B shape at 2048 tokens", "cuda", "bfloat16",
                  QWEN2_5_0_5B, 2048, 4, 10, True,
                  num_generations=8, completion_len=1024, gen_completion_len=1024, prompt_len=128),
    "tiny": Preset("toy model and sequence, for tests", "cpu", "float32",
                   TOY, 32, 1, 3, False,
                   num_generations=4, completion_len=16, gen_completion_len=8, prompt_len=8),
}  # fmt: skip

COLUMNS = [
    *("stage", "impl", "rows", "prompt_len", "seq_len", "tokens"),  # the case
    *("time_s", "tokens_per_s", "vs_eager", "vs_trl"),  # time
    *("state_mib", "peak_extra_mib", "peak_mib", "mem_vs_eager", "mem_vs_trl"),  # memory
    *("loss", "timed_steps", "error"),
]
TABLE_COLUMNS = [c for c in COLUMNS if c != "stage"]  # the markdown's tables: a section per stage


@dataclasses.dataclass(frozen=True)
class Case:
    stage: str
    impl: str
    device: str
    dtype: str
    model: str  # a key of MODELS
    seq_len: int
    batch_size: int
    steps: int
    gradient_checkpointing: bool
    ref_chosen_logps: tuple[float, ...] = ()  # [batch_size] precomputed reference log-probs (DPO)
    ref_rejected_logps: tuple[float, ...] = ()
    num_generations: int = 1  # RL stages: completions per prompt; seq_len is then the completion length
    prompt_len: int = 0

    @property
    def rows(self) -> int:
        if self.stage in RL_STAGES:
            return self.batch_size * self.num_generations
        return self.batch_size * (2 if self.stage == "dpo" else 1)


# ------------------------------------------------------------------------------------------------ model and data


def build_model(shape: ModelShape, dtype: str, device: str, gradient_checkpointing: bool, seed: int = 0):
    """The random-init Qwen2 model of ``shape`` (seeded: every case gets the same weights), in train mode."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastalign.models import select_attention_implementation

    sizes = {key: value for key, value in dataclasses.asdict(shape).items() if key != "name"}
    tokens = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}  # build_tokenizer's <pad>, <s>, </s>
    config = Qwen2Config(**sizes, **tokens, max_position_embeddings=32768, tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=select_attention_implementation(), dtype=DTYPES[dtype]
        )
    if gradient_checkpointing:  # newer transformers call it activation checkpointing
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def build_tokenizer():
    """A word-level tokenizer: the trainers want a ``processing_class``; the benchmark's batches are token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "one", "two", "three", "four"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_batch(
    stage: str, vocab_size: int, seq_len: int, batch_size: int, device: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids, the first quarter of each row a prompt (``-100`` labels).

    SFT: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``. DPO: ``B`` pairs as ``2B`` rows, chosen rows
    first, the prompt shared by a pair: ``input_ids``, ``attention_mask``, ``completion_mask``, ``labels``
    ``[2B, T]`` (what :class:`fastalign.data.PreferenceCollator` makes).
    """
    gen = torch.Generator().manual_seed(seed)
    prompt = seq_len // 4
    if stage == "sft":
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = IGNORE_INDEX
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    else:
        prompts = torch.randint(0, vocab_size, (batch_size, prompt), generator=gen).repeat(2, 1)
        completions = torch.randint(0, vocab_size, (2 * batch_size, seq_len - prompt), generator=gen)
        ids = torch.cat([prompts, completions], dim=1)
        completion_mask = torch.zeros_like(ids)
        completion_mask[:, prompt:] = 1
        labels = ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "completion_mask": completion_mask,
            "labels": labels,
        }
    return {key: value.to(device) for key, value in batch.items()}


def with_reference(batch: dict[str, torch.Tensor], chosen, rejected) -> dict[str, torch.Tensor]:
    """``batch`` plus precomputed reference log-probs ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]``."""
    device = batch["input_ids"].device
    return {
        **batch,
        "ref_chosen_logps": torch.as_tensor(chosen, dtype=torch.float32, device=device),
        "ref_rejected_logps": torch.as_tensor(rejected, dtype=torch.float32, device=device),
    }


def reference_logps(case: Case) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Summed completion log-probs of the DPO batch under the frozen reference (the model at initialisation, as
    TRL's and fastalign's ``precompute_ref_log_probs`` compute them before training)."""
    from fastalign.models import CausalLMAdapter, shift_labels

    shape = MODELS[case.model]
    model = build_model(shape, case.dtype, case.device, gradient_checkpointing=False).eval()
    batch = make_batch("dpo", shape.vocab_size, case.seq_len, case.batch_size, case.device)
    with torch.no_grad():
        logps = CausalLMAdapter(model).token_logprobs(
            batch["input_ids"], batch["attention_mask"], shift_labels(batch["labels"])
        )
    sums = logps.sum(-1).double().cpu().tolist()
    del model, logps
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return tuple(sums[: case.batch_size]), tuple(sums[case.batch_size :])


# ------------------------------------------------------------------------------------------------------- losses


def trl_status() -> str | None:
    """``None`` when TRL's trainers import, else why not."""
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install trl)"
    try:
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401
    except Exception as error:  # any import-time failure: a missing dependency, an incompatible transformers
        return f"trl does not import: {type(error).__name__}: {error}"
    return None


def trl_ppo_status() -> str:
    """Why the ppo stage has no TRL row."""
    for module in ("trl", "trl.experimental.ppo"):
        with contextlib.suppress(Exception):
            if hasattr(importlib.import_module(module), "PPOTrainer"):
                return (
                    "TRL's PPOTrainer does rollout and update inside its own train() loop, with no update "
                    "step that can be timed on a fixed rollout"
                )
    return f"TRL {package_version('trl')} ships no PPOTrainer (neither trl nor trl.experimental)"


def _eager_loss(model, stage: str) -> Callable[[dict], torch.Tensor]:
    """Full logits in float32. SFT: cross-entropy over the label tokens, the token mean of fastalign's SFTTrainer.
    DPO: log_softmax gathered and summed over each completion; sigmoid DPO, mean over pairs."""
    from fastalign.models import shift_labels

    def loss(batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = shift_labels(batch["labels"])
        if stage == "sft":
            total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            return total / (targets != IGNORE_INDEX).sum().clamp_min(1)
        token_logps = eager_logprobs_from_logits(logits, targets.clamp_min(0))
        ref_logps = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        return eager_dpo_loss(token_logps, targets != IGNORE_INDEX, ref_logps)

    return loss


def _common_args(device: str, workdir: str) -> dict:
    # Checkpointing is set on the model (the same for every implementation): the configs' flag only acts in train().
    return {
        "output_dir": workdir,
        "report_to": "none",
        "use_cpu": device == "cpu",
        "bf16": False,
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def make_loss(case: Case, model, workdir: str) -> tuple[Callable[[dict], torch.Tensor], tuple[str, ...]]:
    """``(loss(batch) -> scalar, keys of the batch it reads)`` for one case.

    ``fastalign`` and ``trl``: the trainer's own ``compute_loss`` on a trainer built around ``model`` (TRL's
    trainers patch the model's forward with their chunked LM head, so each case gets its own model).
    """
    if case.impl == "eager":
        keys = ("input_ids", "attention_mask", "labels", "ref_chosen_logps", "ref_rejected_logps")
        return _eager_loss(model, case.stage), keys
    tokenizer = build_tokenizer()
    common = _common_args(case.device, workdir)
    if case.impl == "fastalign" and case.stage == "sft":
        from fastalign.trainers import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model, args=SFTConfig(**common), processing_class=tokenizer)
        keys = ("input_ids", "attention_mask", "labels")
    elif case.impl == "fastalign":
        from fastalign.trainers.configs import DPOConfig
        from fastalign.trainers.dpo import DPOTrainer

        args = DPOConfig(**common, beta=DPO_BETA, precompute_ref_log_probs=True)
        trainer = DPOTrainer(model, args=args, processing_class=tokenizer)
        keys = ("input_ids", "attention_mask", "completion_mask", "labels", "ref_chosen_logps", "ref_rejected_logps")
    elif case.stage == "sft":
        import datasets
        from trl import SFTConfig, SFTTrainer

        train = datasets.Dataset.from_dict({"text": ["one two three four"]})
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=train, processing_class=tokenizer)
        keys = ("input_ids", "attention_mask", "labels")
    else:
        import datasets
        from trl import DPOConfig, DPOTrainer

        # A one-pair dataset: TRL requires one; its reference pass over it is what frees the step of a ref model.
        train = datasets.Dataset.from_dict({"prompt": ["one two"], "chosen": [" three"], "rejected": [" four"]})
        args = DPOConfig(**common, beta=DPO_BETA, precompute_ref_log_probs=True)
        trainer = DPOTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
        # TRL passes every key but completion_mask and the reference log-probs to the model: no labels.
        keys = ("input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps")
    model.train()

    def loss(batch: dict) -> torch.Tensor:
        return trainer.compute_loss(model, dict(batch))  # a copy: TRL's compute_loss adds keys to its inputs

    return loss, keys


# ------------------------------------------------------------------------------------------------- RL stages
# grpo: the training step on a fixed rollout (generation excluded); grpo-gen: one full GRPOTrainer step, HF
# generation and scoring included; ppo: one PPO update (policy + value model) on a fixed rollout. ``seq_len`` is
# the completion length, ``prompt_len`` the prompt's, rows = prompts (batch_size) x num_generations.

GRPO_EPSILON = 0.2
RL_NOISE = 0.1  # std of the old log-probs' offset from the policy's, so the ratios are not all 1


def completion_reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """A reward that differs between completions of random tokens (their ids' sum mod 7)."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def prompt_text(prompt_len: int) -> str:
    """A ``prompt_len``-word prompt of :func:`build_tokenizer`'s words."""
    words = ["one", "two", "three", "four"]
    return " ".join(words[i % 4] for i in range(prompt_len))


def make_rollout(case: Case, vocab_size: int, completion_len: int, model, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed rollout: ``batch_size`` random prompts, each with ``num_generations`` random completions of up to
    ``completion_len`` tokens (row ``i`` shorter by ``i * completion_len // (2 * rows)``, so masking is exercised),
    old log-probs = the policy's log-probs at ``seed`` plus noise, group-normalised advantages ``[N]`` (GRPO) or
    per-token advantages, old values and returns ``[N, C]`` (PPO)."""
    from fastalign.models import CausalLMAdapter

    gen = torch.Generator().manual_seed(seed)
    rows, prompt = case.rows, case.prompt_len
    prompt_ids = torch.randint(0, vocab_size, (case.batch_size, prompt), generator=gen)
    prompt_ids = prompt_ids.repeat_interleave(case.num_generations, dim=0)
    completion_ids = torch.randint(0, vocab_size, (rows, completion_len), generator=gen)
    lengths = completion_len - torch.arange(rows) * completion_len // (2 * rows)
    completion_mask = (torch.arange(completion_len)[None] < lengths[:, None]).long()
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp_min(0),
    }
    noise = RL_NOISE * torch.randn(rows, completion_len, generator=gen)
    if case.stage == "ppo":
        advantages = torch.randn(rows, completion_len, generator=gen)
        batch["old_values"] = 0.1 * torch.randn(rows, completion_len, generator=gen) * completion_mask
        batch["returns"] = torch.randn(rows, completion_len, generator=gen) * completion_mask
        batch["advantages"] = advantages * completion_mask
    else:
        rewards = torch.randn(case.batch_size, case.num_generations, generator=gen)
        batch["advantages"] = ((rewards - rewards.mean(1, keepdim=True)) / rewards.std(1, keepdim=True)).flatten()
    batch = {key: value.to(case.device) for key, value in batch.items()}
    targets = torch.full_like(input_ids, IGNORE_INDEX).to(case.device)
    targets[:, prompt - 1 : -1] = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX).to(case.device)
    with torch.no_grad():
        logps = CausalLMAdapter(model).token_logprobs(
            input_ids.to(case.device), attention_mask.to(case.device), targets, position_ids=batch["position_ids"]
        )
    old = (logps[:, prompt - 1 : -1].float() + noise.to(case.device)) * batch["completion_mask"]
    batch["old_logps"] = batch["old_per_token_logps"] = old
    tokens = batch["completion_mask"].sum()
    batch["num_items_in_batch"] = tokens.float()  # TRL's dapo normaliser
    batch["generation_tokens"] = tokens.float().expand(rows)  # fastalign's
    return batch


def _eager_policy_logps(model, batch: dict) -> torch.Tensor:
    """``[N, C]`` completion log-probs from full float32 logits (0 off the mask)."""
    completion = batch["completion_ids"].shape[1]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits[:, -completion - 1 : -1]
    return eager_logprobs_from_logits(logits, batch["completion_ids"]) * batch["completion_mask"]


def _eager_grpo_loss(model) -> Callable[[dict], torch.Tensor]:
    """DAPO-normalised clipped surrogate (token mean over the batch), β = 0, from full logits."""

    def loss(batch: dict) -> torch.Tensor:
        logps = _eager_policy_logps(model, batch)
        mask = batch["completion_mask"]
        clip = (1 - GRPO_EPSILON, 1 + GRPO_EPSILON)
        return eager_clipped_surrogate(logps, batch["old_logps"], batch["advantages"][:, None], mask, clip)

    return loss


def _grpo_trainer(case: Case, model, workdir: str, train, tokenizer, **extra):
    """fastalign's or TRL's GRPOTrainer (``case.impl``) around ``model``, both set to the same GRPO step."""
    if case.impl == "fastalign":
        from fastalign.trainers.configs import GRPOConfig
        from fastalign.trainers.grpo import GRPOTrainer
    else:
        from trl import GRPOConfig, GRPOTrainer
    args = GRPOConfig(
        **_common_args(case.device, workdir),
        num_generations=case.num_generations,
        max_completion_length=case.seq_len,
        per_device_train_batch_size=case.rows,
        beta=0.0,
        temperature=1.0,
        epsilon=GRPO_EPSILON,
        loss_type="dapo",
        **extra,
    )
    trainer = GRPOTrainer(
        model, reward_funcs=[completion_reward], args=args, train_dataset=train, processing_class=tokenizer
    )
    # Trainer sets it in its training loop; TRL's loss reads it.
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def make_rl_loss(case: Case, model, workdir: str) -> tuple[Callable[[dict], torch.Tensor], object]:
    """``(loss(batch) -> scalar, the module the optimiser trains)`` for the grpo and ppo stages."""
    import datasets

    tokenizer = build_tokenizer()
    train = datasets.Dataset.from_dict({"prompt": [prompt_text(case.prompt_len)]})
    if case.stage == "ppo":
        from fastalign.trainers.configs import PPOConfig
        from fastalign.trainers.ppo import PPOTrainer

        args = PPOConfig(
            **_common_args(case.device, workdir),
            kl_coef=0.0,
            temperature=1.0,
            num_generations=case.num_generations,
            per_device_train_batch_size=case.rows,
            response_length=case.seq_len,
        )
        torch.manual_seed(1)  # the value head's init: the same for fastalign and eager
        trainer = PPOTrainer(model, reward_funcs=[completion_reward], args=args, processing_class=tokenizer)
        wrapper = trainer.model
        if case.impl == "fastalign":
            return (lambda batch: trainer.compute_loss(wrapper, dict(batch))), wrapper

        def ppo_loss(batch: dict) -> torch.Tensor:
            mask = batch["completion_mask"]
            completion = mask.shape[1]
            logps = _eager_policy_logps(trainer.policy, batch)
            clip = (1 - args.cliprange, 1 + args.cliprange)
            policy = eager_clipped_surrogate(logps, batch["old_logps"], batch["advantages"], mask, clip)
            values = trainer.value_model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            values = values[:, -completion - 1 : -1].float()
            old, returns = batch["old_values"], batch["returns"]
            clipped = old + (values - old).clamp(-args.cliprange_value, args.cliprange_value)
            per_token = 0.5 * torch.max((values - returns).square(), (clipped - returns).square())
            return policy + args.vf_coef * (per_token * mask).sum() / mask.sum().clamp_min(1)

        return ppo_loss, wrapper
    if case.impl == "eager":
        return _eager_grpo_loss(model), model
    trainer = _grpo_trainer(case, model, workdir, train, tokenizer)
    model.train()
    return (lambda batch: trainer.compute_loss(model, dict(batch))), model


def build_generation_step(case: Case, model, workdir: str) -> Callable[[], torch.Tensor]:
    """grpo-gen: ``step_loss()``: one ``Trainer.training_step`` (generation, scoring, loss, backward) on the
    trainer's first generation batch; the optimiser step is the caller's."""
    import datasets

    tokenizer = build_tokenizer()
    train = datasets.Dataset.from_dict({"prompt": [prompt_text(case.prompt_len)] * case.batch_size})
    model.config.use_cache = True  # generation with a KV cache (training forwards turn it off)
    trainer = _grpo_trainer(case, model, workdir, train, tokenizer, max_steps=1)
    generation_batch = next(iter(trainer.get_train_dataloader()))

    def step_loss() -> torch.Tensor:
        return trainer.training_step(trainer.model, generation_batch, None)

    return step_loss


def _allocate_optimizer_state(module, optimizer) -> None:
    """Zero gradients through one optimiser step: the AdamW state exists before the measured step."""
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_rl_case(case: Case, workdir: str):
    """``(optimizer, step_loss(inputs) -> loss after backward, batch, warm-up batch)``; for grpo-gen the batches
    are None (the trainer makes its own) and the optimizer state is allocated by a zero-gradient step."""
    shape = MODELS[case.model]
    model = build_model(shape, case.dtype, case.device, case.gradient_checkpointing)
    if case.stage == "grpo-gen":
        step_loss = build_generation_step(case, model, workdir)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        _allocate_optimizer_state(model, optimizer)
        return optimizer, (lambda _inputs: step_loss()), None, None
    batch = make_rollout(case, shape.vocab_size, case.seq_len, model)
    warm = make_rollout(case, shape.vocab_size, min(WARMUP_TOKENS, case.seq_len), model, seed=1)
    loss_fn, module = make_rl_loss(case, model, workdir)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-6)

    def step_loss(inputs: dict) -> torch.Tensor:
        loss = loss_fn(inputs)
        loss.backward()
        return loss

    return optimizer, step_loss, batch, warm


# ---------------------------------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory_before(device: str) -> int:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return rss_baseline()  # the warm-up's freed gradients handed back: the step cannot reuse them unseen


def _memory_peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()


def build_case(case: Case, workdir: str):
    """``(model, optimizer, loss(batch), batch, warm-up batch)`` of one case, each batch holding the keys its
    implementation reads."""
    shape = MODELS[case.model]
    model = build_model(shape, case.dtype, case.device, case.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    loss, keys = make_loss(case, model, workdir)

    def batch_of(seq_len: int) -> dict[str, torch.Tensor]:
        batch = make_batch(case.stage, shape.vocab_size, seq_len, case.batch_size, case.device)
        if case.stage == "dpo":
            chosen = case.ref_chosen_logps or (0.0,) * case.batch_size
            rejected = case.ref_rejected_logps or (0.0,) * case.batch_size
            batch = with_reference(batch, chosen, rejected)
        return {key: value for key, value in batch.items() if key in keys}

    return model, optimizer, loss, batch_of(case.seq_len), batch_of(min(WARMUP_TOKENS, case.seq_len))


def _measure_steps(case: Case, workdir: str) -> dict:
    if case.stage in RL_STAGES:
        optimizer, step_loss, batch, warm = build_rl_case(case, workdir)
    else:
        _model, optimizer, loss_fn, batch, warm = build_case(case, workdir)

        def step_loss(inputs: dict) -> torch.Tensor:
            loss = loss_fn(inputs)
            loss.backward()
            return loss

    def step(inputs: dict | None) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(inputs)
        optimizer.step()
        return loss.detach()

    if warm is not None:
        step(warm)  # allocates the AdamW state, pages in the code
    if case.device == "cuda":
        step(batch)  # kernel autotuning and cuBLAS workspaces outside the measured step
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    _sync(case.device)
    before = _memory_before(case.device)
    start = time.perf_counter()
    loss = step(batch)
    _sync(case.device)
    first = time.perf_counter() - start
    peak = _memory_peak(case.device)
    times = []
    for _ in range(case.steps):
        start = time.perf_counter()
        step(batch)
        _sync(case.device)
        times.append(time.perf_counter() - start)
    return {
        "time_s": statistics.median(times) if times else first,
        "state_mib": before / 2**20,
        "peak_extra_mib": max(0, peak - before) / 2**20,
        "peak_mib": peak / 2**20,
        "loss": float(loss),
        "timed_steps": len(times) or 1,
    }


def run_case(case: Case) -> dict:
    """Measure one case in this process: ``time_s`` (median), ``state_mib``, ``peak_extra_mib``, ``peak_mib``,
    ``loss`` and ``timed_steps``."""
    with tempfile.TemporaryDirectory() as workdir:
        result = _measure_steps(case, workdir)
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return result


def measure(case: Case, isolate: bool) -> dict:
    """:func:`run_case` in a fresh interpreter (``isolate``) or here; errors become an ``error`` entry."""
    if not isolate:
        try:
            return run_case(case)
        except Exception as error:  # an out-of-memory or a trainer refusing the setup is a result, not a crash
            return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    return run_in_fresh_process("bench.train_step", "--case", json.dumps(dataclasses.asdict(case)))


# ------------------------------------------------------------------------------------------------------ reports


def add_derived(rows: list[dict]) -> None:
    """tokens/s; speed and step memory relative to eager and to TRL on the same stage."""
    for row in rows:
        if "time_s" in row:
            row["tokens_per_s"] = row["tokens"] / row["time_s"]
    for base_impl in ("eager", "trl"):
        relative_to(rows, base_impl, lambda row: row["stage"], "time_s", f"vs_{base_impl}", f"mem_vs_{base_impl}")


def check_targets(rows: list[dict]) -> list[tuple[bool | None, str]]:
    """The issue's H100 targets, fastalign vs TRL per stage: ``(met, text)``, ``met`` None when not measured."""
    results = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        speed_target, memory_target = TARGETS[stage]
        ours = next((r for r in rows if r["stage"] == stage and r["impl"] == "fastalign" and "time_s" in r), None)
        theirs = next((r for r in rows if r["stage"] == stage and r["impl"] == "trl" and "time_s" in r), None)
        if ours is None or theirs is None:
            missing = "fastalign" if ours is None else "trl"
            results.append(
                (None, f"{stage}: tokens/s >= {speed_target}x TRL's: not measured ({missing} has no result)")
            )
            results.append((None, f"{stage}: step peak memory <= {100 * memory_target:.0f}% of TRL's: not measured"))
            continue
        speed, memory = ours["vs_trl"], ours["mem_vs_trl"]
        results.append(
            (
                speed >= speed_target,
                f"{stage}: tokens/s >= {speed_target}x TRL's: {speed:.2f}x "
                f"({ours['tokens_per_s']:.0f} vs {theirs['tokens_per_s']:.0f} tokens/s)",
            )
        )
        mib = f"{ours['peak_extra_mib']:.0f} vs {theirs['peak_extra_mib']:.0f} MiB"
        results.append(
            (
                memory <= memory_target,
                f"{stage}: step peak memory <= {100 * memory_target:.0f}% of TRL's: {100 * memory:.0f}% ({mib})",
            )
        )
    return results


def render(rows: list[dict], env: dict[str, str], preset_name: str, title: str, command: str, notes: list[str]) -> str:
    lines = header(f"fastalign training-step benchmark: `{preset_name}` ({title})", env, command)
    lines += [
        "One step: `zero_grad`, the loss forward, backward, `AdamW.step`. `fastalign`: the trainer's own",
        "`compute_loss` (fastalign.trainers SFTTrainer / DPOTrainer: fused cross-entropy / log-probs on the hidden",
        "states, no `[tokens, vocab]` logits); `eager`: `model(...).logits` → float32 `cross_entropy` /",
        "`log_softmax` + gather, the same loss formula; `trl`: TRL's SFTTrainer / DPOTrainer `compute_loss`. DPO:",
        "sigmoid loss, β = 0.1, 1 pair = 2 rows (chosen, rejected) sharing the prompt, the reference's summed",
        "log-probs precomputed (`precompute_ref_log_probs`), so the step is the policy's forward and backward.",
        "Every row's first quarter is prompt (no loss). time_s: median of the timed steps (the measured step's",
        "own time when timed_steps is 1 on CPU). state_mib: memory before the step (model, AdamW state; on CPU",
        "the process's RSS, libraries included). peak_extra_mib: the step's peak above that, parameter gradients",
        "included (the same for every implementation). peak_mib: the total. vs_*: that row's time / this time;",
        "mem_vs_*: this peak_extra / that row's. CPU: peak RSS in a fresh process per case (`/proc/self/clear_refs`);",
        "CUDA: `torch.cuda.max_memory_allocated`.",
        "",
    ]
    if any(r["stage"] in RL_STAGES for r in rows):
        lines += [
            "RL stages (rows = prompts × generations; seq_len: completion tokens, tokens: completion tokens, the",
            "ones trained on; prompt_len: prompt tokens). `grpo`: the training step on one fixed rollout (random",
            "completions, row i shorter by i·C/2N, old log-probs = the initial policy's + N(0, 0.1) noise,",
            "group-normalised random advantages), generation excluded: fastalign GRPOTrainer.compute_loss",
            "(LinearPolicyLoss on the hidden states); eager: the same loss from full float32 logits; trl: TRL's",
            "GRPOTrainer.compute_loss on its input format (prompt/completion ids and masks, advantages,",
            "old_per_token_logps, num_items_in_batch). Loss: DAPO normalisation (token mean over the batch), ε = 0.2,",
            "β = 0, temperature 1. `grpo-gen`: one `Trainer.training_step` of each trainer on a generation batch",
            "(HF generation with a KV cache, reward scoring, advantages, loss, backward) plus the AdamW step; its",
            "AdamW state is allocated by a zero-gradient step beforehand, and there is no separate warm-up step.",
            "`ppo`: one PPO update of policy and value model (a copy of the policy backbone + value head, one",
            "AdamW) on a fixed rollout (random per-token advantages, old values, returns): fastalign",
            "PPOTrainer.compute_loss (clipped surrogate, ε = 0.2, + 0.1 × clipped value loss, token means, KL in",
            "the reward so none in the loss); eager: the same from full logits.",
            "",
        ]
    lines += [f"- {note}" for note in notes]
    lines += [""] if notes else []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        lines += [f"## {stage}", "", markdown_table([r for r in rows if r["stage"] == stage], TABLE_COLUMNS), ""]
    lines += ["## targets", ""]
    if preset_name == "gpu":
        lines += ["fastalign vs TRL at the same batch (the issue's H100 targets), judged where both were measured:", ""]
        lines += checklist(check_targets(rows))
    elif preset_name == "cpu":
        lines += ["No speed targets on CPU: the memory figures are the record (the targets are the `gpu` preset's)."]
    else:
        lines += [f"`{preset_name}` is informational; the targets are the `gpu` preset's."]
    return "\n".join(lines) + "\n"


def write(
    rows: list[dict], env: dict[str, str], preset_name: str, title: str, command: str, notes: list[str], out: Path
) -> Path:
    """Write ``train_step-<preset>[-<gpu>].{csv,md}``; return the markdown path."""
    rl = bool(rows) and all(r["stage"] in RL_STAGES for r in rows)
    device = rows[0]["device"] if rows else "cpu"
    markdown = render(rows, env, preset_name, title, command, notes)
    return write_tables(rows, COLUMNS, markdown, f"train_step-{'rl-' if rl else ''}{preset_name}", env, device, out)


# ------------------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_step",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1]
        + "\npresets:\n"
        + "\n".join(
            f"  {k:5s} {p.description}: {p.model.name}, T={p.seq_len}, batch {p.batch_size}, {p.dtype}, {p.device}, "
            f"{p.steps} timed steps"
            for k, p in PRESETS.items()
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu with CUDA, else cpu")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(DEFAULT_STAGES),
        help="default: sft dpo; the RL stages: grpo grpo-gen ppo",
    )
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--batch-size", type=int, help="SFT rows / DPO pairs per step (default: the preset's)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: the preset's)")
    parser.add_argument("--steps", type=int, help="timed steps after the memory step (default: the preset's)")
    parser.add_argument("--num-generations", type=int, help="RL: completions per prompt (default: the preset's)")
    parser.add_argument("--completion-len", type=int, help="grpo, ppo: completion tokens (default: the preset's)")
    parser.add_argument("--gen-completion-len", type=int, help="grpo-gen: generated tokens (default: the preset's)")
    parser.add_argument("--prompt-len", type=int, help="RL: prompt tokens (default: the preset's)")
    parser.add_argument(
        "--no-gradient-checkpointing",
        action="store_true",
        help="keep all activations (default: checkpointing, as the trainers' configs)",
    )
    parser.add_argument("--out", type=Path, help=f"output folder (default: {RESULTS})")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case (JSON) in this process
    args = parser.parse_args(argv)
    if args.case:
        return args
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    args.out = args.out or RESULTS
    if PRESETS[args.preset].device == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset!r} needs a CUDA device and torch sees none")
    preset = PRESETS[args.preset]
    for name in ("num_generations", "completion_len", "gen_completion_len", "prompt_len"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    for name in ("batch_size", "seq_len", "num_generations", "completion_len", "gen_completion_len", "prompt_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len is not None and args.seq_len < 4:
        parser.error("--seq-len must be >= 4 (a prompt and a completion)")
    if args.steps is not None and args.steps < 0:
        parser.error("--steps must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            case[key] = tuple(case[key])
        print(json.dumps(run_case(Case(**case))))
        return
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or preset.batch_size
    seq_len = args.seq_len or preset.seq_len
    steps = preset.steps if args.steps is None else args.steps
    checkpointing = not args.no_gradient_checkpointing
    trl_missing = trl_status() if "trl" in args.impls else None
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for stage in args.stages:
        stage_len = seq_len
        if stage in RL_STAGES:
            stage_len = args.gen_completion_len if stage == "grpo-gen" else args.completion_len
        case = Case(
            stage,
            "",
            preset.device,
            preset.dtype,
            preset.model.name,
            stage_len,
            batch_size,
            steps,
            checkpointing,
            num_generations=args.num_generations if stage in RL_STAGES else 1,
            prompt_len=args.prompt_len if stage in RL_STAGES else 0,
        )
        if stage == "dpo":
            print("dpo: reference log-probs ...", file=sys.stderr, flush=True)
            chosen, rejected = reference_logps(case)
            case = dataclasses.replace(case, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
        for impl in args.impls:
            if stage == "grpo-gen" and impl == "eager":
                continue  # generation is the same HF generate; the eager loss is the grpo row's
            case = dataclasses.replace(case, impl=impl)
            row = {
                "stage": stage,
                "impl": impl,
                "device": preset.device,
                "rows": case.rows,
                "seq_len": stage_len,
                "tokens": case.rows * stage_len,
                "prompt_len": case.prompt_len or "",
            }
            print(f"{stage} {impl} ...", end=" ", file=sys.stderr, flush=True)
            if impl == "trl" and trl_missing:
                result = {"error": f"skipped: {trl_missing}"}
            elif impl == "trl" and stage == "ppo":
                result = {"error": f"skipped: {trl_ppo_status()}"}
            else:
                result = measure(case, preset.isolate)
            print(
                result.get("error") or f"{result['time_s']:.3g} s, {result['peak_extra_mib']:.0f} MiB", file=sys.stderr
            )
            rows.append({**row, **result})
    add_derived(rows)
    env = {**environment(preset.device), "transformers": package_version("transformers")}
    shape = preset.model
    env["model"] = (
        f"{shape.name}-shaped Qwen2ForCausalLM, random init: hidden {shape.hidden_size}, "
        f"{shape.num_hidden_layers} layers, {shape.num_attention_heads} heads / "
        f"{shape.num_key_value_heads} KV heads, intermediate {shape.intermediate_size}, vocabulary "
        f"{shape.vocab_size}, tied embeddings, {preset.dtype}"
    )
    if load_at_start is not None:  # other work on the machine slows the steps, most on CPU
        env["load average (1 min) at start / end"] = f"{load_at_start:.2f} / {os.getloadavg()[0]:.2f}"
    env["gradient checkpointing"] = "on (the trainers' default)" if checkpointing else "off"
    notes = []
    rl_stages = [stage for stage in args.stages if stage in RL_STAGES]
    if rl_stages:
        rl_settings = (args.num_generations, args.completion_len, args.gen_completion_len, args.prompt_len)
        preset_rl = (preset.num_generations, preset.completion_len, preset.gen_completion_len, preset.prompt_len)
        notes.append(
            f"RL stages: {batch_size} prompt(s) x {args.num_generations} generations, prompt {args.prompt_len} "
            f"tokens, completion {args.completion_len} tokens (grpo, ppo), {args.gen_completion_len} generated "
            f"tokens (grpo-gen)" + (" (overridden from the preset)" if rl_settings != preset_rl else "")
        )
        if preset.device == "cpu" and preset.model is QWEN2_5_0_5B:
            notes.append(
                "CPU: shorter than the issue's 8 generations x 1024 completion tokens (the gpu preset's) so the run "
                "stays within minutes on a few cores; grpo-gen generates fewer tokens still, since HF generation "
                "of a 0.5B model on CPU takes a decode step per token."
            )
    if (batch_size, seq_len, steps) != (preset.batch_size, preset.seq_len, preset.steps):
        notes.append(f"overridden from the preset: batch {batch_size}, sequence length {seq_len}, {steps} timed steps")
    if preset.device == "cpu" and steps == 0 and preset.model is QWEN2_5_0_5B:
        notes.append(
            "CPU: one full-size step per case (after the 16-token warm-up): at this shape a step takes "
            "minutes on a few cores, so its time is a single measurement, not a median."
        )
    command = "python -m bench.train_step " + shlex.join(argv)
    overridden = any(note.startswith("overridden") or note.endswith("(overridden from the preset)") for note in notes)
    title = preset.description + (", overridden" if overridden else "")
    path = write(rows, env, args.preset, title, command.strip(), notes, args.out)
    print(path.read_text())
    print(f"written: {path} and {path.with_suffix('.csv')}", file=sys.stderr)


if __name__ == "__main__":
    main()
