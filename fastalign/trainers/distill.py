"""Knowledge distillation from a frozen teacher on ``transformers.Trainer`` (TRL 1.16's ``DistillationTrainer``,
with GKD's ``lmbda`` mixing of on- and off-policy batches).

One optimiser step: the sampler hands over a *generation batch* of dataset rows (``per_device_train_batch_size ×
gradient_accumulation_steps``); with probability ``lmbda`` the student samples their completions through the
rollout engine (on-policy), otherwise the dataset's ``completion`` column is used (off-policy). The batch is cut
into ``gradient_accumulation_steps`` micro-batches; each runs the teacher's backbone without gradient and the
student's with it, and :func:`fastalign.linear_distill_loss` takes both hidden states and both lm_head weights:
the divergence over the whole vocabulary, with neither head's ``[tokens × vocab]`` logits ever formed. The loss
is the token mean over the generation batch (summed over processes, as TRL's ``num_items_in_batch``).

Which batches are on-policy is a function of the seed and the optimiser step alone (every process draws the same,
and a resumed run draws what the uninterrupted one would have).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import nn
from transformers import PreTrainedModel

from fastalign._padding import pad_rows
from fastalign.data import tokenize_sft
from fastalign.models import load_causal_lm
from fastalign.models.causal_lm import CausalLMAdapter
from fastalign.ops.distill import linear_distill_loss
from fastalign.rollout import RolloutBatch
from fastalign.rollout._types import left_pad
from fastalign.trainers._common import NumTokensLogMixin, TrainTokenCount, disable_dropout
from fastalign.trainers.configs import DistillConfig
from fastalign.trainers.online import PER_BATCH, OnlineTrainer, PolicyBatch, completion_positions


@dataclass
class DistillBatch(PolicyBatch):
    """A :class:`~fastalign.trainers.online.PolicyBatch` (no old / reference log-probs, no advantages) and:

    Attributes:
        generation_tokens: float32 scalar, the completion tokens of the whole generation batch summed over the
            processes (the token mean's divisor).
        on_policy: float32 scalar, 1 when the student sampled the completions, 0 for the dataset's.
    """

    generation_tokens: torch.Tensor | None = dataclasses.field(default=None, metadata=PER_BATCH)
    on_policy: torch.Tensor | None = dataclasses.field(default=None, metadata=PER_BATCH)


class DistillTrainer(NumTokensLogMixin, OnlineTrainer):
    """Distillation of a student from a frozen teacher with fastalign's fused divergence (TRL's
    ``DistillationTrainer`` keywords).

    Args:
        model: the student, a causal LM or its name/path.
        teacher_model: the teacher, a causal LM or its name/path (default: ``args.teacher_model_name_or_path``).
            It must share the student's vocabulary (the divergence compares whole next-token distributions): the
            lm_head rows must match and, where the teacher's tokenizer is known (a path, or
            ``teacher_processing_class``), every token must have the same id; it may be wider or narrower.
        args: :class:`DistillConfig`.
        train_dataset / eval_dataset: a ``prompt`` column (standard or conversational); with ``lmbda < 1`` also a
            ``completion`` column, the off-policy batches' completions.
        processing_class: the student's tokenizer. teacher_processing_class: the teacher's (for the check only).
        peft_config: a ``peft`` config for the student.
        rollout_engine: a :class:`fastalign.rollout.RolloutEngine`; default: ``HFGenerateEngine`` on the student.
    """

    dataset_format = "distill"
    batch_type = DistillBatch
    scored = False

    def __init__(
        self,
        model: PreTrainedModel | str,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillConfig | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        rollout_engine: Any = None,
        teacher_processing_class: Any = None,
        **kwargs: Any,
    ):
        args = args if args is not None else DistillConfig(output_dir="fastalign-distill")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("no teacher: pass teacher_model or set DistillConfig.teacher_model_name_or_path")
        if isinstance(teacher_model, str):
            path = teacher_model
            teacher_model = load_causal_lm(path, revision=args.teacher_model_revision or "main")
            if teacher_processing_class is None:
                teacher_processing_class = teacher_tokenizer(path, args.teacher_model_revision)
        if args.lmbda < 1:
            for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
                if dataset is not None and "completion" not in dataset.column_names:
                    raise ValueError(
                        f"lmbda={args.lmbda} draws off-policy batches from the dataset's completions, but "
                        f"{name} has no 'completion' column (columns: {sorted(dataset.column_names)}); add one or "
                        "set lmbda=1 (every batch sampled by the student)"
                    )
        super().__init__(
            model,
            None,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            peft_config,
            rollout_engine,
            kl_coef=0.0,
            max_completion_length=args.max_completion_length,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            **kwargs,
        )
        check_same_vocabulary(self.policy, teacher_model, self.processing_class, teacher_processing_class)
        self.teacher_model = teacher_model.requires_grad_(False).eval()
        disable_dropout(self.teacher_model)
        self.teacher_model.to(self.args.device)
        for role, module in (("student", self.policy), ("teacher", self.teacher_model)):
            _check_plain_head(role, CausalLMAdapter(module))
        self._train_tokens = TrainTokenCount()
        self._rollout_rows = args.generation_batch_size
        self._eval_rows = args.per_device_eval_batch_size
        self._micro_batches_per_rollout = args.gradient_accumulation_steps

    # ------------------------------------------------------------------------------------------- generation

    def _is_on_policy(self, mode: str) -> bool:
        """Whether this generation batch is sampled by the student: a draw of probability ``lmbda`` seeded by the
        seed and the optimiser step. Evaluation is on-policy unless ``lmbda`` is 0."""
        lmbda = self.args.lmbda
        if mode == "eval" or lmbda in (0.0, 1.0):
            return lmbda > 0
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        return bool(torch.rand((), generator=generator) < lmbda)

    def _generate_and_score(self, rows: list[dict], mode: str) -> DistillBatch:
        """One generation batch: the student's completions (on-policy) or the dataset's (off-policy)."""
        on_policy = self._is_on_policy(mode)
        if on_policy:
            self._before_sampling()
            rows, generated = self._sample(rows)
        else:
            self._stop_if_loss_was_not_finite()
            generated = self._dataset_completions(rows)
        batch = self._policy_batch(generated)
        batch.on_policy = torch.tensor(float(on_policy))
        metrics = self._metrics[mode]
        metrics["on_policy"].append(batch.on_policy)
        self._log_completions(mode, generated, torch.empty(len(rows), 0))
        if mode == "train":
            self._train_tokens.add(generated.prompt_mask.sum() + generated.completion_mask.sum())
            if self.args.log_completions:
                self._completions_sample = self._sample_rows(rows, generated, on_policy)
        return batch

    def _dataset_completions(self, rows: list[dict]) -> RolloutBatch:
        """The rows' ``prompt`` + ``completion`` as a batch like the engine's: prompts (their last
        ``max_prompt_length`` tokens) left-padded, completions (their first ``max_completion_length`` tokens, EOS
        included when it fits) right-padded."""
        pad = self.processing_class.pad_token_id
        prompts, completions = [], []
        for row in rows:
            tokens = tokenize_sft(row, self.processing_class)
            ids, mask = tokens["input_ids"], tokens["completion_mask"]
            start = mask.index(1) if 1 in mask else len(ids)
            prompt, completion = ids[:start], ids[start:]
            limit = self.args.max_prompt_length
            if limit is not None and len(prompt) > limit:
                prompt = prompt[-limit:] if limit > 0 else []
            if not prompt:
                raise ValueError(f"a dataset row's prompt tokenizes to nothing: {row.get('prompt')!r}")
            prompts.append(prompt)
            completions.append(completion[: self.args.max_completion_length])
        prompt_ids, prompt_mask = left_pad(prompts, pad)
        width = max(1, max(len(c) for c in completions))
        completion_ids = pad_rows(completions, pad, width)
        completion_mask = pad_rows([[1] * len(c) for c in completions], 0, width)
        eos = self.eos_token_id
        truncated = torch.tensor([eos not in c for c in completions])
        return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated)

    def _micro_batches(self, batch: DistillBatch, mode: str) -> list[DistillBatch]:
        """``gradient_accumulation_steps`` shuffled micro-batches (the whole batch in evaluation), each with the
        generation batch's completion tokens summed over the processes (one all-reduce per generation batch)."""
        parts = self._shuffled_parts(batch, self.args.gradient_accumulation_steps) if mode == "train" else [batch]
        tokens = batch.completion_mask.sum().float()
        if self.accelerator.num_processes > 1:
            tokens = self._sum_over_processes(tokens)
        for part in parts:
            part.generation_tokens, part.on_policy = tokens, batch.on_policy
        return parts

    # ------------------------------------------------------------------------------------------------- loss

    @torch.no_grad()
    def _teacher_head(self, batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's hidden states at the completion positions ``[N, C, Dt]`` (divided by its fixed logit
        divisor) and its lm_head weight ``[V, Dt]``, without gradient."""
        adapter = self._adapter(self.teacher_model)

        def head(hidden: torch.Tensor, weight: torch.Tensor, bias: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return _unscaled(completion_positions(hidden, batch.completion_ids), adapter), weight

        return adapter.fused_forward(head, batch.input_ids, batch.attention_mask, batch.position_ids)

    def _loss(self, model: nn.Module, batch: DistillBatch):
        args = self.args
        teacher_hidden, teacher_weight = self._teacher_head(batch)
        targets = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
        adapter = self._adapter(model)
        # The generation batch's token mean, per process: DDP / FSDP average the gradients over the processes.
        tokens = batch.generation_tokens.clamp_min(1) / self.accelerator.num_processes

        def divergence(hidden: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
            student_hidden = _unscaled(completion_positions(hidden, batch.completion_ids), adapter)
            summed = linear_distill_loss(
                student_hidden,
                weight,
                teacher_hidden.to(student_hidden.dtype),
                teacher_weight.to(weight.dtype),
                targets,
                beta=args.beta,
                temperature=args.temperature,
                reduction="sum",
                backend=args.backend,
            )
            return summed / tokens

        # One forward of the model as Trainer hands it over (DDP wrapper / FSDP2 root), see GRPOTrainer._loss.
        loss = adapter.fused_forward(divergence, batch.input_ids, batch.attention_mask, batch.position_ids)
        counted = batch.completion_mask.sum().clamp_min(1)
        metrics = {"divergence": loss.detach() * tokens / counted}  # this micro-batch's token mean
        return loss, metrics, {}

    # -------------------------------------------------------------------------------------------------- logs

    def _sample_rows(self, rows: list[dict], batch: RolloutBatch, on_policy: bool) -> dict[str, list]:
        """The printed sample: prompt and completion of the first ``num_completions_to_print`` rows, and whether
        the student sampled them."""
        count = len(rows) if self.args.num_completions_to_print is None else self.args.num_completions_to_print
        ids = [row[mask.bool()].tolist() for row, mask in zip(batch.completion_ids, batch.completion_mask, strict=True)]
        texts = self.processing_class.batch_decode(ids[:count], skip_special_tokens=True)
        return {
            "step": [self.state.global_step] * len(texts),
            "prompt": [row["prompt"] for row in rows[:count]],
            "completion": texts,
            "on_policy": [on_policy] * len(texts),
        }


def _unscaled(hidden: torch.Tensor, adapter: CausalLMAdapter) -> torch.Tensor:
    """``hidden`` divided by the model's fixed logit divisor (Cohere / Granite), so that ``hidden @ weight.T`` are
    its logits; most models have none, and their hidden states are passed on without a copy."""
    return hidden if adapter.logit_temperature == 1.0 else hidden / adapter.logit_temperature


def teacher_tokenizer(path: str, revision: str | None, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with the teacher (for :func:`check_same_vocabulary`), or None when its folder / repo has
    none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision or "main", trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def check_same_vocabulary(student: nn.Module, teacher: nn.Module, student_tokenizer: Any, teacher_tokenizer: Any):
    """Refuse a teacher whose vocabulary differs from the student's: the lm_head rows must be as many, and where
    both tokenizers are known every token must have the same id.

    Raises:
        ValueError: naming the sizes, or the first tokens whose ids differ.
    """
    rows = {
        role: module.get_output_embeddings().weight.shape[0]
        for role, module in (("student", student), ("teacher", teacher))
    }
    if rows["student"] != rows["teacher"]:
        raise ValueError(
            f"the teacher's lm_head has {rows['teacher']} rows and the student's {rows['student']}: distillation "
            "compares whole next-token distributions, so both need the same vocabulary (the same tokenizer)"
        )
    if teacher_tokenizer is None or student_tokenizer is None:
        return
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    differing = sorted(
        token
        for token in student_vocab.keys() | teacher_vocab.keys()
        if student_vocab.get(token) != teacher_vocab.get(token)
    )
    if differing:
        shown = "; ".join(f"{t!r}: {student_vocab.get(t)} vs {teacher_vocab.get(t)}" for t in differing[:3])
        more = ", ..." if len(differing) > 3 else ""
        raise ValueError(
            f"the teacher's tokenizer differs from the student's in {len(differing)} tokens (id in the student's vs "
            f"the teacher's: {shown}{more}): distillation needs the same tokenizer on both sides"
        )


def _check_plain_head(role: str, adapter: CausalLMAdapter) -> None:
    """The fused divergence reads ``hidden @ weight.T``: a bias or a final-logit softcap would be dropped."""
    if adapter.bias is not None:
        raise ValueError(f"the {role}'s lm_head has a bias: the fused distillation loss takes bias-free heads only")
    if adapter.softcap is not None:
        raise ValueError(
            f"the {role} softcaps its logits (final_logit_softcapping={adapter.softcap}): the fused distillation "
            "loss does not apply a softcap"
        )
