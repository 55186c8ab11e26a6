"""fastalign.models: the adapter's fused log-probs / losses / gradients equal the eager HF path; heads; loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from fastalign.models import (
    CausalLMAdapter,
    ValueHeadModel,
    load_causal_lm,
    load_reward_model,
    select_attention_implementation,
    sequence_rewards,
    shift_labels,
)
from fastalign.models import causal_lm as causal_lm_module

VOCAB, HIDDEN, SEQ, BATCH = 128, 32, 12, 3
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def _llama(**overrides):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, **overrides}))


def _qwen2_tied():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True))


def _gemma2_softcap():
    config = transformers.Gemma2Config(
        **SMALL, head_dim=8, final_logit_softcapping=3.0, attn_implementation="eager", sliding_window=8
    )
    return transformers.Gemma2ForCausalLM(config)


def _cohere_scaled():
    # Cohere multiplies logits by logit_scale; a scale far from 1 makes a missing factor obvious.
    return transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.3))


def _granite_scaled():
    # Granite divides logits by logits_scaling.
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(**SMALL, logits_scaling=4.0))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=8))


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=8))


def _phi3():
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL))


def _gemma3_softcap():
    # Gemma 3's text model: the softcap sits in the text config.
    config = transformers.Gemma3TextConfig(
        **SMALL, head_dim=8, final_logit_softcapping=5.0, attn_implementation="eager", sliding_window=8
    )
    return transformers.Gemma3ForCausalLM(config)


MODELS = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gemma3-softcap": _gemma3_softcap,
    "qwen2-tied": _qwen2_tied,
    "gemma2-softcap": _gemma2_softcap,
    "cohere-scale": _cohere_scaled,
    "granite-scale": _granite_scaled,
}


def _model(name):
    torch.manual_seed(0)
    model = MODELS[name]().float()
    # Random init is tiny; spread the lm_head so the log-probs are not all ≈ -log V.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


def _batch(left_pad=False):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    lengths = torch.tensor([SEQ, SEQ - 4, SEQ - 7])
    positions = torch.arange(SEQ)
    starts = SEQ - lengths[:, None] if left_pad else torch.zeros_like(lengths[:, None])
    attention_mask = ((positions >= starts) & (positions < starts + lengths[:, None])).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 3] = -100  # an ignored position inside a row (e.g. a prompt token)
    return input_ids, attention_mask, shift_labels(labels)


def _eager_logprobs(model, input_ids, attention_mask, targets, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != -100
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0), logits


def test_shift_labels():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]


def test_config_transform_read():
    assert CausalLMAdapter(_model("gemma2-softcap")).softcap == 3.0
    assert CausalLMAdapter(_model("cohere-scale")).logit_temperature == pytest.approx(1 / 0.3)
    assert CausalLMAdapter(_model("granite-scale")).logit_temperature == pytest.approx(4.0)
    llama = CausalLMAdapter(_model("llama"))
    assert llama.softcap is None and llama.logit_temperature == 1.0


def test_tied_weight_is_the_embedding():
    model = _model("qwen2-tied")
    assert CausalLMAdapter(model).weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", list(MODELS))
def test_token_logprobs_match_eager(name, temperature, left_pad):
    model = _model(name)
    adapter = CausalLMAdapter(model)
    input_ids, attention_mask, targets = _batch(left_pad)
    with torch.no_grad():
        logp, entropy = adapter.token_logprobs(
            input_ids, attention_mask, targets, temperature=temperature, return_entropy=True
        )
        expected, logits = _eager_logprobs(model, input_ids, attention_mask, targets, temperature)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    assert (logp[targets == -100] == 0).all()
    full = torch.log_softmax(logits / temperature, dim=-1)
    expected_entropy = torch.where(targets != -100, -(full.exp() * full).sum(-1), 0.0)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_match_eager(name):
    model = _model(name)
    adapter = CausalLMAdapter(model)
    input_ids, attention_mask, targets = _batch()
    # A loss that weights tokens unevenly, so every position's gradient matters.
    weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(2))

    (adapter.token_logprobs(input_ids, attention_mask, targets, temperature=0.8) * weights).sum().backward()
    fused = _grads(model)
    model.zero_grad(set_to_none=True)
    expected, _ = _eager_logprobs(model, input_ids, attention_mask, targets, temperature=0.8)
    (expected * weights).sum().backward()
    eager = _grads(model)

    assert fused.keys() == eager.keys() and len(fused) == len(list(model.parameters()))
    for key in eager:
        # Normwise (the house rule): gradients reach ~1e2 here, so float32 rounding alone is ~1e-5 absolute.
        error = (fused[key] - eager[key]).abs().max() / eager[key].abs().max().clamp_min(1e-3)
        assert error < 1e-5, f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_cross_entropy_matches_hf_loss(name):
    model = _model(name)
    adapter = CausalLMAdapter(model)
    input_ids, attention_mask, targets = _batch()
    loss = adapter.cross_entropy_loss(input_ids, attention_mask, targets, label_smoothing=0.1)
    loss.backward()
    fused = _grads(model)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for key, grad in _grads(model).items():
        torch.testing.assert_close(fused[key], grad, rtol=1e-5, atol=1e-5, msg=key)


def _lora_llama(target_modules):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0)
    model = peft.get_peft_model(_model("llama"), config)
    # LoRA's B starts at zero; make the adapters do something so the check is not vacuous.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def test_peft_lora_wrapped_model():
    model = _lora_llama(["q_proj", "v_proj"])
    adapter = CausalLMAdapter(model)
    assert adapter.weight is model.get_base_model().lm_head.weight
    input_ids, attention_mask, targets = _batch()

    logp = adapter.token_logprobs(input_ids, attention_mask, targets)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        expected = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(logp, torch.where(targets != -100, expected, 0.0), rtol=1e-5, atol=1e-5)

    logp.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert with_grad == lora and lora
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora)


def test_lora_on_lm_head_refused():
    model = _lora_llama(["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        CausalLMAdapter(model)


def test_model_without_output_embeddings_refused():
    backbone = transformers.LlamaModel(transformers.LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="no output embeddings"):
        CausalLMAdapter(backbone)


def test_softcap_with_logit_scale_refused():
    model = _model("cohere-scale")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="ambiguous"):
        CausalLMAdapter(model)


def test_attention_selection(monkeypatch):
    monkeypatch.setattr(causal_lm_module, "_flash_attn_available", lambda: False)
    assert select_attention_implementation(None) == "sdpa"
    assert select_attention_implementation("eager") == "eager"
    # Gemma 2 cannot run sdpa (attention softcapping): the automatic choice steps down to eager.
    assert select_attention_implementation(None, transformers.Gemma2ForCausalLM) == "eager"
    monkeypatch.setattr(causal_lm_module, "_flash_attn_available", lambda: True)
    assert select_attention_implementation(None) == "flash_attention_2"
    assert select_attention_implementation("sdpa") == "sdpa"
    assert select_attention_implementation(None, transformers.Gemma2ForCausalLM) == "flash_attention_2"


def test_attention_default_without_flash_attn():
    # The CPU test machine has no flash_attn / no CUDA.
    assert select_attention_implementation(None) == "sdpa"


def test_load_causal_lm_from_local_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(causal_lm_module, "_flash_attn_available", lambda: False)
    _model("llama").save_pretrained(tmp_path / "llama")
    _model("gemma2-softcap").save_pretrained(tmp_path / "gemma2")
    llama = load_causal_lm(str(tmp_path / "llama"), dtype=torch.float32)
    assert isinstance(llama, transformers.LlamaForCausalLM)
    assert llama.config._attn_implementation == "sdpa"
    gemma = load_causal_lm(str(tmp_path / "gemma2"))
    assert gemma.config._attn_implementation == "eager"
    assert load_causal_lm(str(tmp_path / "llama"), attn_implementation="eager").config._attn_implementation == "eager"


def test_value_head_model(tmp_path):
    critic = ValueHeadModel(_model("llama"))
    assert not hasattr(critic.backbone, "lm_head")
    input_ids, attention_mask, _ = _batch()
    values = critic(input_ids, attention_mask)
    assert values.shape == (BATCH, SEQ) and values.dtype == torch.float32
    values.sum().backward()
    assert critic.value_head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in critic.backbone.parameters() if p.requires_grad)
    assert critic.backbone.embed_tokens.weight.grad.abs().sum() > 0

    # Save / load through state_dict reproduces the values.
    torch.save(critic.state_dict(), tmp_path / "critic.pt")
    restored = ValueHeadModel(_llama())
    restored.load_state_dict(torch.load(tmp_path / "critic.pt"))
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids, attention_mask), critic(input_ids, attention_mask))


def test_value_head_from_pretrained(tmp_path):
    _model("llama").save_pretrained(tmp_path / "llama")
    critic = ValueHeadModel.from_pretrained(str(tmp_path / "llama"), dtype=torch.float32)
    assert isinstance(critic.backbone, transformers.LlamaModel)
    input_ids, attention_mask, _ = _batch()
    assert critic(input_ids, attention_mask).shape == (BATCH, SEQ)


def test_reward_model_scores_last_non_pad_token(tmp_path):
    _model("llama").save_pretrained(tmp_path / "llama")
    model = load_reward_model(str(tmp_path / "llama"), dtype=torch.float32, pad_token_id=0)
    assert isinstance(model, transformers.LlamaForSequenceClassification) and model.config.num_labels == 1
    input_ids, attention_mask, _ = _batch()  # right padding with pad id 0
    rewards = sequence_rewards(model, input_ids, attention_mask)
    assert rewards.shape == (BATCH,) and rewards.dtype == torch.float32
    with torch.no_grad():
        pooled = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1
        expected = model.score(hidden[torch.arange(BATCH), last])[:, 0]
    torch.testing.assert_close(rewards, pooled)
    torch.testing.assert_close(rewards, expected)
    # A padded row scores like the same row unpadded.
    with torch.no_grad():
        short = int(attention_mask[2].sum())
        alone = sequence_rewards(model, input_ids[2:3, :short], attention_mask[2:3, :short])
    torch.testing.assert_close(rewards[2:3], alone, rtol=1e-5, atol=1e-5)
