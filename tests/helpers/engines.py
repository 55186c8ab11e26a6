"""A rollout engine with its own copy of the weights and a callback recording the weights after each optimizer
step: what the online trainers' weight-sync tests compare."""

import copy

import torch
from transformers import TrainerCallback


class OwnCopyEngine:
    """A rollout engine that samples from its OWN copy of the weights (as vLLM does) and records, at each
    generation, the weights it sampled with."""

    def __init__(self, model, tokenizer):
        from fastalign.rollout import HFGenerateEngine

        self.copy = copy.deepcopy(model)
        self.inner = HFGenerateEngine(self.copy, pad_token_id=tokenizer.pad_token_id, eos_token_id=3)
        self.sampled_with: list[dict[str, torch.Tensor]] = []
        self.syncs = 0

    def generate(self, prompts, params):
        self.sampled_with.append({n: p.detach().clone() for n, p in self.copy.named_parameters()})
        return self.inner.generate(prompts, params)

    def sync_weights(self, model):
        self.syncs += 1
        self.copy.load_state_dict(model.state_dict())


class RecordWeights(TrainerCallback):
    def __init__(self, model):
        self.model, self.after_step = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
