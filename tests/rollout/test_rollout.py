"""fastalign.rollout: the HF-generate engine on a tiny Llama, SamplingParams, the vLLM engine's import guard and
the importance weights of every mode."""

from __future__ import annotations

import importlib
import math
import re
import sys

import pytest
import torch
from helpers.tiny import tiny_causal_lm, word_tokenizer

from fastalign.rollout import (
    HFGenerateEngine,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    VLLMEngine,
    sampler_importance_weights,
    truncated_importance_weights,
)
from fastalign.rollout._types import completion_mask_after_eos

PAD, EOS = 0, 3


@pytest.fixture
def model():
    m = tiny_causal_lm("llama")
    m.train()
    return m


@pytest.fixture
def prompts():
    tok = word_tokenizer()
    texts = ["add one to two . the answer is", "what is", "the sky is blue ?"]
    return [tok(t)["input_ids"] for t in texts]


def _engine(model, **kwargs):
    return HFGenerateEngine(model, pad_token_id=PAD, eos_token_id=EOS, **kwargs)


def _eos_logit_hook(model, value: float):
    """Add ``value`` to the EOS logit of every lm_head output (-inf: EOS is never sampled)."""

    def hook(module, args, output):
        output = output.clone()
        output[..., EOS] = output[..., EOS] + value
        return output

    return model.lm_head.register_forward_hook(hook)


def _forward_logps(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` at the completion tokens, from one full forward of prompt+completion."""
    ids, mask, positions = batch.input_ids()
    p = batch.prompt_ids.shape[1]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    model.train(was_training)
    logits = logits[:, p - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)


def test_shapes_row_order_and_left_padding(model, prompts):
    params = SamplingParams(num_generations=4, max_completion_length=7, temperature=1.0)
    batch = _engine(model).generate(prompts, params, seed=0)
    n, p = len(prompts) * 4, max(map(len, prompts))
    assert batch.prompt_ids.shape == batch.prompt_mask.shape == (n, p)
    c = batch.completion_ids.shape[1]
    assert 1 <= c <= 7
    assert batch.completion_mask.shape == batch.sampler_logps.shape == (n, c)
    assert batch.truncated.shape == (n,) and batch.truncated.dtype == torch.bool
    assert batch.prompt_ids.dtype == batch.prompt_mask.dtype == batch.completion_ids.dtype == torch.long
    assert batch.completion_mask.dtype == torch.long and batch.sampler_logps.dtype == torch.float32
    assert len(batch) == n
    for i, prompt in enumerate(prompts):
        rows = slice(4 * i, 4 * (i + 1))  # prompt i's generations are contiguous
        pad = p - len(prompt)
        assert (batch.prompt_ids[rows, pad:] == torch.tensor(prompt)).all()
        assert (batch.prompt_ids[rows, :pad] == PAD).all()
        assert (batch.prompt_mask[rows, :pad] == 0).all() and (batch.prompt_mask[rows, pad:] == 1).all()


def test_completion_mask_stops_after_first_eos(model, prompts):
    handle = _eos_logit_hook(model, 3.0)  # EOS likely: completions of different lengths
    try:
        params = SamplingParams(num_generations=6, max_completion_length=10, temperature=1.0)
        batch = _engine(model).generate(prompts, params, seed=1)
    finally:
        handle.remove()
    ids, mask = batch.completion_ids, batch.completion_mask
    ended = 0
    for row in range(ids.shape[0]):
        eos = (ids[row] == EOS).nonzero().flatten()
        if len(eos):
            first = int(eos[0])
            ended += 1
            assert (mask[row, : first + 1] == 1).all() and (mask[row, first + 1 :] == 0).all()
            assert (ids[row, first + 1 :] == PAD).all()
            assert not batch.truncated[row]
            assert (batch.sampler_logps[row, first + 1 :] == 0).all()
        else:
            assert (mask[row] == 1).all() and batch.truncated[row]
    assert ended > 0
    # the longest completion sets C
    assert ids.shape[1] == int(mask.sum(1).max())


def test_mask_helper_on_handmade_ids():
    ids = torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8], [3, 0, 0, 0], [5, 9, 3, 0]])
    mask, truncated = completion_mask_after_eos(ids, [3, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]


def test_truncated_when_eos_never_sampled(model, prompts):
    handle = _eos_logit_hook(model, float("-inf"))
    try:
        params = SamplingParams(num_generations=2, max_completion_length=5, temperature=1.0)
        batch = _engine(model).generate(prompts, params, seed=0)
    finally:
        handle.remove()
    assert batch.completion_ids.shape == (len(prompts) * 2, 5)
    assert batch.truncated.all()
    assert (batch.completion_mask == 1).all()
    assert (batch.completion_ids != EOS).all()


@pytest.mark.parametrize(
    "extra",
    [{}, {"top_k": 5, "top_p": 0.9, "min_p": 0.01, "repetition_penalty": 1.3}],
    ids=["plain", "filters-and-penalty"],
)
def test_sampler_logps_match_full_forward(model, prompts, extra):
    # The reported log-probs are log_softmax(logits / T) BEFORE top-k/top-p/min-p and the repetition penalty.
    params = SamplingParams(num_generations=3, max_completion_length=8, temperature=0.7, **extra)
    batch = _engine(model).generate(prompts, params, seed=2)
    expected = _forward_logps(model, batch, 0.7)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.sampler_logps[mask], expected[mask], atol=1e-4, rtol=0)
    assert (batch.sampler_logps[~mask] == 0).all()


def test_sampler_logps_through_peft_lora(prompts):
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm("llama")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.train()
    params = SamplingParams(num_generations=2, max_completion_length=6, temperature=0.7)
    batch = _engine(lora).generate(prompts, params, seed=3)
    assert lora.training and base.training
    expected = _forward_logps(lora, batch, 0.7)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.sampler_logps[mask], expected[mask], atol=1e-4, rtol=0)


def test_greedy_is_deterministic(model, prompts):
    params = SamplingParams(num_generations=3, max_completion_length=6, temperature=0.0)
    engine = _engine(model)
    torch.manual_seed(0)
    first = engine.generate(prompts, params)
    torch.manual_seed(1)
    second = engine.generate(prompts, params)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert first.sampler_logps is None  # no sampling distribution to report for argmax decoding
    for i in range(len(prompts)):
        rows = first.completion_ids[3 * i : 3 * (i + 1)]
        assert (rows == rows[0]).all()
    # every kept greedy token is the argmax of a plain forward over prompt + completion
    ids, mask, positions = first.input_ids()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    model.train()
    argmax = logits[:, first.prompt_ids.shape[1] - 1 : -1].argmax(-1)
    keep = first.completion_mask.bool()
    assert torch.equal(argmax[keep], first.completion_ids[keep])


def test_seeded_sampling_reproducible_and_leaves_global_rng(model, prompts):
    params = SamplingParams(num_generations=2, max_completion_length=6, temperature=1.0)
    engine = _engine(model)
    torch.manual_seed(123)
    a = engine.generate(prompts, params, seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    b = engine.generate(prompts, params, seed=7)
    after_b = torch.rand(3)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.sampler_logps, b.sampler_logps)
    torch.manual_seed(123)
    assert torch.equal(after_a, torch.rand(3)) and torch.equal(after_b, after_a)  # caller's RNG untouched


def test_model_state_restored(model, prompts):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    checkpointing = model.is_gradient_checkpointing if checkpointing is None else checkpointing
    assert checkpointing
    model.config.use_cache = False
    model.model.layers[0].mlp.eval()  # a submodule deliberately in eval mode stays so
    params = SamplingParams(num_generations=2, max_completion_length=4)
    batch = _engine(model).generate(prompts, params, seed=0)
    assert model.training and model.model.training and not model.model.layers[0].mlp.training
    after = getattr(model, "is_activation_checkpointing", None)
    assert (model.is_gradient_checkpointing if after is None else after) and model.config.use_cache is False
    assert torch.is_grad_enabled()
    assert all(p.requires_grad for p in model.parameters())
    assert not batch.completion_ids.requires_grad and not batch.sampler_logps.requires_grad
    # the rollout feeds a differentiable training forward
    ids, mask, positions = batch.input_ids()
    model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_batch_size_chunking(model, prompts):
    params = SamplingParams(num_generations=2, max_completion_length=6, temperature=1.0)
    whole = _engine(model).generate(prompts, params, seed=4)
    chunked = _engine(model, batch_size=1).generate(prompts, params, seed=4)
    assert chunked.prompt_ids.shape == whole.prompt_ids.shape
    assert torch.equal(chunked.prompt_ids, whole.prompt_ids) and torch.equal(chunked.prompt_mask, whole.prompt_mask)
    assert chunked.completion_ids.shape[0] == whole.completion_ids.shape[0]
    assert chunked.sampler_logps.shape == chunked.completion_ids.shape == chunked.completion_mask.shape
    expected = _forward_logps(model, chunked, 1.0)
    mask = chunked.completion_mask.bool()
    torch.testing.assert_close(chunked.sampler_logps[mask], expected[mask], atol=1e-4, rtol=0)
    greedy = SamplingParams(num_generations=2, max_completion_length=6, temperature=0.0)
    a = _engine(model).generate(prompts, greedy)
    b = _engine(model, batch_size=2).generate(prompts, greedy)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)


def test_return_logps_false_and_sync_is_noop(model, prompts):
    engine = _engine(model, return_logps=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.sync_weights(model)
    batch = engine.generate(prompts, SamplingParams(num_generations=1, max_completion_length=3), seed=0)
    assert batch.sampler_logps is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(engine, RolloutEngine)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_generations": 0}, "num_generations"),
        ({"num_generations": 2.0}, "num_generations"),
        ({"max_completion_length": 0}, "max_completion_length"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_frozen():
    params = SamplingParams()
    assert (params.num_generations, params.max_completion_length, params.temperature) == (8, 256, 1.0)
    assert params.top_k is None and params.min_p is None and not params.greedy
    assert SamplingParams(temperature=0).greedy
    with pytest.raises(AttributeError):
        params.temperature = 0.5


def test_engine_argument_errors(model):
    with pytest.raises(ValueError, match="batch_size"):
        HFGenerateEngine(model, pad_token_id=PAD, eos_token_id=EOS, batch_size=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        HFGenerateEngine(model, pad_token_id=PAD, eos_token_id=[])
    engine = _engine(model)
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate([[2, 5], []], SamplingParams())
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate([[2, 5]], {"temperature": 1.0})


def test_vllm_engine_import_error_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    module = importlib.reload(importlib.import_module("fastalign.rollout.vllm_engine"))  # imports without vllm
    with pytest.raises(ImportError, match=r'pip install "fastalign\[vllm\]"'):
        module.VLLMEngine("some/model")
    with pytest.raises(ImportError, match="vLLM"):
        VLLMEngine("some/model", gpu_memory_utilization=0.5)


def test_truncated_importance_weights_values_and_cap():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -1.0, -3.0, float("nan")], [-1.0, -2.0, 0.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    w = truncated_importance_weights(trainer, sampler, mask, cap=2.0)
    expected = torch.tensor(
        [
            [torch.exp(torch.tensor(0.5)), torch.exp(torch.tensor(-1.0)), 2.0, 1.0],  # exp(2.5) capped; NaN -> 1
            [1.0, 2.0, torch.exp(torch.tensor(-1.0)), 1.0],  # exp(1) = 2.718 capped; masked -> 1
        ]
    )
    torch.testing.assert_close(w, expected)
    assert w.dtype == torch.float32 and not w.requires_grad and w.shape == (2, 4)
    w_bf16 = truncated_importance_weights(trainer.detach().bfloat16(), sampler.bfloat16(), mask, cap=20.0)
    assert w_bf16.dtype == torch.float32
    assert float(w_bf16[0, 2]) == pytest.approx(float(torch.exp(torch.tensor(2.5))), rel=2e-2)
    assert truncated_importance_weights(trainer, sampler, mask).max() <= 3.0  # TRL's default clip_max


def test_sampler_importance_weights_in_each_mode():
    """Δ = trainer − sampler on kept tokens (NaN: 0): per token exp(Δ), per sequence exp(ΣΔ); truncate clamps
    into [clip_min, clip_max], mask zeroes outside it (bounds kept)."""
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.5, -1.0, -3.0, float("nan")], [-1.0, -2.0, -0.5, 4.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    e = math.exp
    token = torch.tensor([[e(0.5), e(-1.0), e(2.5), 1.0], [1.0, e(1.0), e(-0.5), 1.0]])
    sequence = torch.tensor([e(0.5 - 1.0 + 2.5), e(1.0 - 0.5)])  # exp(2) = 7.39, exp(0.5) = 1.65

    def weights(mode, **bounds):
        return sampler_importance_weights(trainer, sampler, mask, mode=mode, **bounds)

    torch.testing.assert_close(weights("token_truncate", clip_min=0.5, clip_max=2.0), token.clamp(0.5, 2.0))
    torch.testing.assert_close(
        weights("token_mask", clip_min=0.5, clip_max=2.0), torch.where((token >= 0.5) & (token <= 2.0), token, 0.0)
    )
    torch.testing.assert_close(weights("sequence_truncate"), sequence.clamp(max=3.0))  # TRL's clip_max
    torch.testing.assert_close(weights("sequence_mask"), torch.tensor([0.0, e(0.5)]))
    torch.testing.assert_close(weights("sequence_mask", clip_max=None, clip_min=2.0), torch.tensor([e(2.0), 0.0]))
    assert weights("sequence_mask").shape == (2,) and weights("token_mask").shape == (2, 4)


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"mode": "token"}, "mode must be one of"),
        ({"clip_min": 2.0, "clip_max": 2.0}, "clip_min (2.0) must be less than clip_max (2.0)"),
        ({"mode": "token_truncate", "clip_max": None}, "at least one of clip_min or clip_max must be set"),
        ({"clip_max": 0.0}, "clip_max must be None or a number > 0"),
        ({"clip_min": -1.0}, "clip_min must be None or a finite number >= 0"),
    ],
)
def test_sampler_importance_weights_errors(bounds, message):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=re.escape(message)):
        sampler_importance_weights(x, x, x, **bounds)


def test_truncated_importance_weights_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(x, x, x, cap=0)
    with pytest.raises(ValueError, match="shape"):
        truncated_importance_weights(x, torch.zeros(2, 4), x)


def test_hf_engine_logps_give_unit_weights(model, prompts):
    # Same model samples and trains: the IS weights are 1 up to KV-cache numerics.
    params = SamplingParams(num_generations=2, max_completion_length=6, temperature=0.9)
    batch = _engine(model).generate(prompts, params, seed=5)
    w = truncated_importance_weights(_forward_logps(model, batch, 0.9), batch.sampler_logps, batch.completion_mask)
    torch.testing.assert_close(w, torch.ones_like(w), atol=1e-3, rtol=0)
