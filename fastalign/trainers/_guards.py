"""What every fastalign trainer adds to ``transformers.Trainer`` around checkpoints and the loss: resuming
continues ``num_tokens``, refuses a checkpoint without its optimizer state and names an unreadable weights
file; training stops at a non-finite loss with the step and the non-finite input named."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

STATE_FILE = "fastalign_state.json"


class ResumeMixin:
    """For ``Trainer`` subclasses. A checkpoint also holds ``fastalign_state.json`` (``num_tokens`` so far),
    read back on resume (a checkpoint without it falls back to the last ``num_tokens`` it logged)."""

    def _tokens_so_far(self) -> int | None:
        """The global training-token count (a collective: every process calls it), None when not counted."""
        counter = self.__dict__.get("_train_tokens")
        return None if counter is None else counter.read(self.accelerator)

    def _resume_tokens(self, total: int) -> None:
        counter = self.__dict__.get("_train_tokens")
        if counter is not None:
            counter.total = total

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        tokens = self._tokens_so_far()
        super()._save_checkpoint(model, trial)
        if tokens is not None and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            with open(os.path.join(self._get_output_dir(trial=trial), folder, STATE_FILE), "w") as file:
                json.dump({"num_tokens": tokens}, file)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except Exception as exc:
            broken = _unreadable_safetensors(resume_from_checkpoint)
            if broken is None:
                raise
            raise ValueError(
                f"{broken}: cannot be read ({exc}): the checkpoint's weights file is truncated or corrupt (a save "
                "that was cut short?); resume from another checkpoint"
            ) from exc
        tokens = _saved_tokens(resume_from_checkpoint)
        if tokens is not None:
            self._resume_tokens(tokens)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        full = checkpoint is None or self.is_deepspeed_enabled or not os.path.isdir(checkpoint)
        if not full and not any(name.startswith("optimizer") for name in os.listdir(checkpoint)):
            raise ValueError(
                f"{checkpoint} has no optimizer state (optimizer.pt): resuming from it would restart the "
                "optimizer's moments from zero (it was saved with save_only_model=True, or the save was cut "
                f"short). Resume from a full checkpoint, or start a new run from these weights "
                f"(model_name_or_path={checkpoint})"
            )
        super()._load_optimizer_and_scheduler(checkpoint)


def _saved_tokens(checkpoint: str) -> int | None:
    path = os.path.join(checkpoint, STATE_FILE)
    if os.path.isfile(path):
        with open(path) as file:
            return int(json.load(file)["num_tokens"])
    path = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(path):
        with open(path) as file:
            logged = [entry["num_tokens"] for entry in json.load(file).get("log_history", []) if "num_tokens" in entry]
        if logged:
            return int(logged[-1])
    return None


def _unreadable_safetensors(folder: str) -> str | None:
    """The first ``*.safetensors`` file under ``folder`` whose header cannot be read, or None."""
    from safetensors import safe_open

    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                try:
                    with safe_open(path, framework="pt"):
                        pass
                except Exception:
                    return path
    return None


class FiniteLossMixin:
    """For ``Trainer`` subclasses: ``compute_loss`` calls :meth:`_watch_loss` on each training micro-batch; the
    first micro-batch whose loss is not finite is recorded on the device (no host sync in the step) with which of
    its inputs were not finite, and the next ``log()`` stops training with the step and those inputs named (the
    one read of that record, over all processes). A non-finite logged ``loss`` stops it too. A loss once
    non-finite usually makes the weights NaN at the optimizer step, so the error comes after that step."""

    def _watch_loss(self, loss: torch.Tensor, inputs: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]):
        """Record ``loss`` (a scalar) of step ``global_step + 1``. ``inputs``: name -> tensor, or
        ``(tensor, mask)`` to look only where ``mask`` is nonzero."""
        loss = loss.detach()
        flags = [~torch.isfinite(loss).all()]
        for value in inputs.values():
            if isinstance(value, tuple):
                tensor, mask = value
                value = torch.where(mask.to(tensor.device).bool(), tensor.detach(), 0)
            flags.append(~torch.isfinite(value.detach()).all())
        flags = torch.stack(flags)
        step = torch.tensor(float(self.state.global_step + 1), device=loss.device)
        records = self.__dict__.setdefault("_nonfinite", {})  # names -> (first bad step or 0, its flags)
        names = ("loss", *inputs)
        if names not in records:
            records[names] = (torch.where(flags[0], step, 0.0), flags)
            return
        first_step, first_flags = records[names]
        new = (first_step == 0) & flags[0]
        records[names] = (torch.where(new, step, first_step), torch.where(new, flags, first_flags))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._stop_if_loss_was_not_finite(logs)
        super().log(logs, start_time)

    def _stop_if_loss_was_not_finite(self, logs: dict[str, float] | None = None) -> None:
        """Raise ``FloatingPointError`` if a recorded loss (or the logged one) was not finite; every process
        calls it (a gather). The online trainers call it before each generation too."""
        for names, (step, flags) in self.__dict__.get("_nonfinite", {}).items():
            packed = torch.cat([step.reshape(1), flags.float()]).unsqueeze(0)
            rows = self.accelerator.gather(packed).tolist()  # [processes, 1 + names]: one read per log
            bad = [row for row in rows if row[0] > 0]
            if bad:
                row = min(bad, key=lambda r: r[0])
                flagged = [name for name, flag in zip(names, row[1:], strict=True) if flag]
                raise FloatingPointError(_non_finite_message(int(row[0]), flagged))
        loss = (logs or {}).get("loss")
        if loss is not None and self.model.training and not math.isfinite(loss):
            raise FloatingPointError(
                f"step {self.state.global_step}: the logged training loss is {loss}: training stopped"
            )


def _non_finite_message(step: int, bad: list[str]) -> str:
    inputs = [name for name in bad if name != "loss"]
    if inputs:
        cause = f"these inputs of the loss were not finite: {', '.join(inputs)}"
    else:
        cause = (
            "its inputs were finite, so the model's forward produced it (weights, hidden states or logits "
            "overflowed: a learning rate too high, or fp16/bf16 overflow?)"
        )
    return f"step {step}: the training loss is not finite (NaN or inf); {cause}. Training stopped"
