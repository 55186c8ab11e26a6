"""fastalign.patch_model: one model's forward(labels=...) gives Hugging Face's loss and gradients without logits."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers.tiny import tiny_causal_lm
from torch.utils._python_dispatch import TorchDispatchMode

import fastalign
from fastalign.models import patch_model, shift_labels, unpatch_model

BATCH, SEQ = 3, 10


def _gemma2_softcap(vocab_size: int = 30) -> transformers.Gemma2ForCausalLM:
    config = transformers.Gemma2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, sliding_window=8,
        final_logit_softcapping=3.0, attn_implementation="eager",
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(config)


def _cohere_scaled() -> transformers.CohereForCausalLM:
    # Cohere multiplies its logits by logit_scale: far from 1 so that a missing factor shows.
    config = transformers.CohereConfig(
        vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, logit_scale=0.3,
    )  # fmt: skip
    return transformers.CohereForCausalLM(config)


def _model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    builders = {"gemma2-softcap": _gemma2_softcap, "cohere-scale": _cohere_scaled}
    model = builders[name]() if name in builders else tiny_causal_lm(name)
    model = model.to(dtype)
    # Random init is tiny; spread the lm_head (the embedding when tied) so the softcap and the softmax matter.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


def _batch(vocab_size: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of different lengths; labels ignore the padding and a prompt-like prefix of row 1."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, vocab_size, (BATCH, SEQ), generator=g)
    lengths = torch.tensor([SEQ, SEQ - 3, SEQ - 6])
    attention_mask = (torch.arange(SEQ) < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[1, :4] = -100
    return input_ids, attention_mask, labels


def _float64_causal_lm_loss(
    logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
):
    """transformers' ``ForCausalLMLoss`` without its ``logits.float()``: the same shift, ignore_index and
    ``num_items_in_batch`` division, in the logits' own dtype. Hugging Face computes the loss of a float64 model in
    float32 (errors near 1e-7); a float64 comparison needs a float64 reference."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device), ignore_index=ignore_index,
        reduction=reduction,
    )  # fmt: skip
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# Normwise gradient error, the house rule. float32: both sides round differently through the same model (errors
# near 1e-7), 1e-5 leaves a factor 100. float64: rounding is near 1e-15; 1e-10 leaves 10^5 and still fails any
# float32 step on either side (1e-7).
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and expected
    for name, grad in expected.items():
        error = (got[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-3)
        assert error < GRAD_TOLERANCE[grad.dtype], f"{name}: normwise error {error:.2e}"


def _patched_and_reference(name: str, dtype: torch.dtype = torch.float32):
    reference = _model(name, dtype)
    model = copy.deepcopy(reference)
    assert patch_model(model) is model
    if dtype == torch.float64:
        reference.loss_function = _float64_causal_lm_loss
    return model, reference


def test_the_float64_reference_loss_is_hf_loss_formula():
    """The float64 reference above computes what ``ForCausalLMLoss`` does, keyword by keyword (checked in float32,
    where Hugging Face's upcast changes nothing)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(BATCH, SEQ, 30, generator=g) * 3
    _, _, labels = _batch()
    labels_5 = labels.masked_fill(labels == -100, 5)
    cases = [{}, {"num_items_in_batch": torch.tensor(40)}, {"num_items_in_batch": 7},
             {"shift_labels": shift_labels(labels.flip(0))}, {"ignore_index": 5, "labels": labels_5}]  # fmt: skip
    for case in cases:
        case = {"labels": labels, **case}
        expected = ForCausalLMLoss(logits, vocab_size=30, **case)
        got = _float64_causal_lm_loss(logits.double(), vocab_size=30, **case)
        torch.testing.assert_close(got, expected.double(), rtol=1e-6, atol=1e-7, msg=str(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2-softcap", "cohere-scale"])
def test_loss_and_gradients_equal_hf(name, dtype):
    model, reference = _patched_and_reference(name, dtype)
    input_ids, attention_mask, labels = _batch()

    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast) and out.logits is None
    out.loss.backward()
    expected = reference(input_ids, attention_mask=attention_mask, labels=labels)
    assert expected.logits is not None
    expected.loss.backward()

    # float32: rounding of both sides (1e-7); float64: against a float64 reference, far below any float32 step.
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.loss.double(), expected.loss.double(), rtol=tolerance, atol=tolerance)
    _assert_grads_close(_grads(model), _grads(reference))
    if name == "qwen2":  # tied: the fused loss's lm_head gradient lands on the shared embedding
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_loss_keywords_keep_hf_meaning():
    model, reference = _patched_and_reference("llama")
    input_ids, attention_mask, labels = _batch()
    # ignore_index=5: HF pads the shifted labels with it, and every id 5 is ignored too.
    labels_5 = labels.masked_fill(labels == -100, 5)
    cases = [
        (labels, {"num_items_in_batch": torch.tensor(40)}),
        (labels, {"num_items_in_batch": 7}),
        (labels, {"shift_labels": shift_labels(labels.flip(0))}),
        (labels_5, {"ignore_index": 5}),
    ]
    with torch.no_grad():
        plain = reference(input_ids, attention_mask=attention_mask, labels=labels).loss
        for case_labels, kwargs in cases:
            got = model(input_ids, attention_mask=attention_mask, labels=case_labels, **kwargs).loss
            expected = reference(input_ids, attention_mask=attention_mask, labels=case_labels, **kwargs).loss
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=str(kwargs))
            assert not torch.allclose(got, plain), f"{kwargs} did not change the loss"


def test_num_items_in_batch_accumulates_to_the_full_batch_mean():
    # Gradient accumulation as transformers.Trainer does it: micro-batch losses summed over tokens, divided by
    # the optimiser step's token count, add up to the whole batch's mean loss (not a mean of micro means).
    model = patch_model(_model("llama"))
    input_ids, attention_mask, labels = _batch()
    tokens = (shift_labels(labels) != -100).sum()
    with torch.no_grad():
        parts = [
            model(input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows], num_items_in_batch=tokens)
            for rows in (slice(0, 1), slice(1, 3))
        ]
        whole = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    torch.testing.assert_close(parts[0].loss + parts[1].loss, whole, rtol=1e-6, atol=1e-6)


def test_trainer_with_gradient_accumulation_trains_and_evaluates_like_hf(tmp_path):
    """Two Adam steps of 3 accumulated micro-batches (rows of 10, 6 and 4 target tokens) through
    ``transformers.Trainer``: patched and plain models end with the same weights and evaluation loss.

    In float64, against the float64 form of Hugging Face's loss. In float32 the comparison depends on the CPU:
    Adam's first step divides each gradient by its own magnitude (plus eps 1e-8), so a float32 rounding difference
    of 1e-9 in a gradient near zero moves a weight by up to lr * 0.1 = 1e-3 (seen: 1.4e-6 on one CPU, under 1e-6 on
    another). In float64 the same bound is lr * 1e-16 / 1e-8 = 1e-10 per step (seen: 1e-16); 1e-8 over two steps
    leaves a factor 50, while the updates are 1e-2 and a per-micro-batch mean (``num_items_in_batch`` ignored)
    moves weights by 3e-2."""
    input_ids, attention_mask, labels = _batch()
    rows = [
        {"input_ids": i, "attention_mask": m, "labels": label}
        for i, m, label in zip(input_ids, attention_mask, labels, strict=True)
    ]
    initial = _model("llama", torch.float64).state_dict()
    trained, eval_loss = {}, {}
    for patched in (False, True):
        model = _model("llama", torch.float64)
        if patched:
            patch_model(model)
        else:
            model.loss_function = _float64_causal_lm_loss
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=1, gradient_accumulation_steps=3,
            max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
            dataloader_drop_last=False, seed=0, data_seed=0,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        assert trainer.model_accepts_loss_kwargs  # so it passes num_items_in_batch to the patched forward
        trainer.train()
        trained[patched] = model.state_dict()
        eval_loss[patched] = trainer.evaluate(rows)["eval_loss"]
    for name, expected in trained[False].items():
        assert (expected - initial[name]).abs().max() > 1e-3, name  # the steps moved every weight
        torch.testing.assert_close(trained[True][name], expected, rtol=0, atol=1e-8, msg=name)
    assert eval_loss[True] == pytest.approx(eval_loss[False], rel=1e-12)


def test_patch_is_per_instance_idempotent_and_reversible():
    model, other = _model("llama"), _model("llama")
    class_forward = type(model).forward
    input_ids, _, labels = _batch()

    patch_model(model)
    patch_model(model)  # harmless: still one layer around the class's forward
    assert model.forward.__wrapped__ is class_forward
    assert type(model).forward is class_forward and "forward" not in vars(other)
    assert not hasattr(other, "token_logprobs")
    assert other(input_ids, labels=labels).logits is not None
    assert model(input_ids, labels=labels).logits is None

    clone = copy.deepcopy(model)  # e.g. a trainer's reference copy: patched, and bound to the copy
    assert clone.forward.__self__ is clone and clone(input_ids, labels=labels).logits is None

    assert unpatch_model(model) is model
    unpatch_model(model)  # harmless too
    assert "forward" not in vars(model) and not hasattr(model, "token_logprobs")
    assert model(input_ids, labels=labels).logits is not None
    assert fastalign.patch_model is patch_model and fastalign.unpatch_model is unpatch_model


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap"])
def test_without_labels_forward_and_generate_are_the_original(name):
    model, reference = _patched_and_reference(name)
    input_ids, attention_mask, _ = _batch()
    with torch.no_grad():
        got = model(input_ids, attention_mask=attention_mask)
        expected = reference(input_ids, attention_mask=attention_mask)
    assert torch.equal(got.logits, expected.logits)

    prompt = input_ids[:, :4]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert generated.shape == (BATCH, 9)
    assert torch.equal(generated, reference.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs))


class _AllocationWatcher(TorchDispatchMode):
    """The largest tensor (bytes) any aten op produces, leaving out tensors shaped like a parameter (gradients)."""

    def __init__(self, parameter_shapes: set[tuple[int, ...]]):
        super().__init__()
        self.parameter_shapes = parameter_shapes
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) not in self.parameter_shapes:
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


def test_patched_forward_never_makes_the_logits(scratch_budget):
    vocab = 4096
    scratch_budget(128 << 10)
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=vocab)
    input_ids = torch.randint(4, vocab, (2, 32))
    logits_bytes = input_ids.numel() * vocab * 4  # 1 MiB of float32 logits
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    shapes = {tuple(p.shape) for p in model.parameters()}

    def peak(run_model):
        with _AllocationWatcher(shapes) as watcher:
            run_model(input_ids, labels=input_ids).loss.backward()
        return watcher.largest

    eager_peak = peak(model)  # the check can fail: the eager path does make the logits, through the lm_head
    assert eager_peak >= logits_bytes and head_calls == [1]
    patch_model(model)
    assert peak(model) <= logits_bytes // 8
    assert head_calls == [1]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2-softcap"])
def test_token_logprobs_equal_eager_log_softmax(name):
    model, reference = _patched_and_reference(name)
    input_ids, attention_mask, labels = _batch()
    temperature = 0.7
    with torch.no_grad():
        logits = reference(input_ids, attention_mask=attention_mask).logits.double()
    full = torch.log_softmax(logits / temperature, dim=-1)  # [B, T, V]: full[:, t] predicts token t + 1
    entropy = -(full.exp() * full).sum(-1)

    def expected_at(position_logp, ids, valid):
        picked = position_logp.gather(-1, ids.clamp_min(0)[..., None])[..., 0]
        return torch.where(valid, picked, 0.0)

    # labels, not shifted: out[:, t] = log p(labels[:, t] | tokens before t); the first column is 0.
    logp, ent = model.token_logprobs(
        input_ids, attention_mask, labels=labels, temperature=temperature, return_entropy=True
    )
    assert logp.shape == (BATCH, SEQ) and logp.dtype == torch.float32
    valid = labels != -100
    valid[:, 0] = False
    expected = torch.zeros(BATCH, SEQ, dtype=torch.float64)
    expected[:, 1:] = expected_at(full[:, :-1], labels[:, 1:], valid[:, 1:])
    torch.testing.assert_close(logp.double(), expected, rtol=1e-5, atol=1e-5)
    expected_entropy = torch.zeros(BATCH, SEQ, dtype=torch.float64)
    expected_entropy[:, 1:] = torch.where(valid[:, 1:], entropy[:, :-1], 0.0)
    torch.testing.assert_close(ent.double(), expected_entropy, rtol=1e-5, atol=1e-5)

    # targets, already shifted: out[:, t] = log p(targets[:, t] | tokens up to t).
    targets = shift_labels(labels)
    by_targets = model.token_logprobs(input_ids, attention_mask, targets=targets, temperature=temperature)
    expected_targets = expected_at(full, targets, targets != -100)
    torch.testing.assert_close(by_targets.double(), expected_targets, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_targets.sum(-1), logp.sum(-1))  # same sequence log-likelihoods

    # neither: the input ids themselves, padding ignored.
    own = model.token_logprobs(input_ids, attention_mask)
    own_labels = input_ids.masked_fill(attention_mask == 0, -100)
    full_t1 = torch.log_softmax(logits, dim=-1)
    expected_own = expected_at(full_t1[:, :-1], own_labels[:, 1:], own_labels[:, 1:] != -100)
    torch.testing.assert_close(own[:, 1:].double(), expected_own, rtol=1e-5, atol=1e-5)
    assert (own[:, 0] == 0).all()

    logp.sum().backward()  # differentiable: reaches the backbone and the lm_head
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def _lora(model: torch.nn.Module, target_modules: list[str]):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def test_peft_model_patch_reaches_what_users_call():
    reference = _lora(_model("llama"), ["q_proj", "v_proj"])
    model = copy.deepcopy(reference)
    assert patch_model(model) is model
    input_ids, attention_mask, labels = _batch()

    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits is None
    out.loss.backward()
    expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-6)
    got = _grads(model)
    assert got and all("lora_" in name for name in got)  # the base weights stay frozen
    _assert_grads_close(got, _grads(reference))

    with torch.no_grad():
        logp = model.token_logprobs(input_ids, attention_mask, labels=labels)
        logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(logp[:, 1:], torch.where(labels[:, 1:] != -100, picked, 0.0), rtol=1e-5, atol=1e-5)

    prompt = input_ids[:, :3]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(input_ids=prompt, **kwargs), reference.generate(input_ids=prompt, **kwargs))

    unpatch_model(model)
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="no output embeddings"):
        backbone = transformers.LlamaModel(
            transformers.LlamaConfig(
                vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
            )
        )
        patch_model(backbone)
    with pytest.raises(ValueError, match="lm_head"):
        patch_model(_lora(_model("llama"), ["q_proj", "lm_head"]))

    custom = _model("llama")
    custom.loss_function = lambda *args, **kwargs: torch.tensor(0.0)
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        patch_model(custom)

    wrapped = _model("llama")
    wrapped.forward = wrapped.forward  # what accelerate's prepare() does for autocast, in spirit
    with pytest.raises(ValueError, match="already set on this instance"):
        patch_model(wrapped)

    model = patch_model(_model("llama"))
    input_ids, _, labels = _batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids, labels=labels, logits_to_keep=1)
    with pytest.raises(ValueError, match="output_router_logits"):
        model(input_ids, labels=labels, output_router_logits=True)
    with pytest.raises(ValueError, match="not both"):
        model.token_logprobs(input_ids, labels=labels, targets=shift_labels(labels))
    model.loss_function = lambda *args, **kwargs: torch.tensor(0.0)  # changed after patching: refused per call
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        model(input_ids, labels=labels)

    rewrapped = patch_model(_model("llama"))
    rewrapped.forward = rewrapped.forward.__wrapped__.__get__(rewrapped)
    with pytest.raises(ValueError, match="replaced after patch_model"):
        unpatch_model(rewrapped)


def test_top_level_names_load_on_first_use():
    import subprocess
    import sys

    probe = (
        "import sys, fastalign; print('transformers' in sys.modules, 'fastalign.models' in sys.modules); "
        "print(fastalign.patch_model.__module__, fastalign.unpatch_model.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "fastalign.models.patch", "unpatch_model"]
