"""Property tests over shapes and options (hypothesis): the ops agree with the reference and obey the laws of
a softmax whatever the sizes, including sizes of 0 and 1 and sizes that are not multiples of any tile."""

import functools
import math

import pytest
import torch
from helpers.oracle import assert_matches_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import fastalign
from fastalign.ops import reference


@st.composite
def linear_problems(draw, max_tokens=40, max_width=33, max_vocab=200):
    leading = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    while math.prod(leading) > max_tokens:
        leading = leading[1:]
    width = draw(st.integers(1, max_width))
    vocab = draw(st.integers(1, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, leading or (1,), generator=gen).reshape(leading)
    ignored = torch.rand(leading, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    inputs = {
        "hidden": torch.randn(*leading, width, generator=gen, dtype=torch.float64),
        "weight": torch.randn(vocab, width, generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0])),
        "targets": torch.where(ignored, -100, targets),
    }
    if draw(st.booleans()):
        inputs["bias"] = torch.randn(vocab, generator=gen, dtype=torch.float64)
    options = {
        "temperature": draw(st.sampled_from([1.0, 0.35, 2.5])),
        "softcap": draw(st.sampled_from([None, 1.5, 30.0])),
        "return_entropy": draw(st.booleans()),
    }
    return inputs, options


@settings(max_examples=60, deadline=None)
@given(linear_problems())
def test_torch_backend_matches_reference(problem):
    inputs, options = problem
    op = functools.partial(fastalign.linear_logprobs, backend="torch")
    assert_matches_reference(op, reference.linear_logprobs, inputs, torch.float32, **options)


@settings(max_examples=15, deadline=None)
@given(linear_problems(max_tokens=12, max_width=20, max_vocab=70))
def test_triton_backend_matches_reference(problem):
    inputs, options = problem
    op = functools.partial(fastalign.linear_logprobs, backend="triton")
    assert_matches_reference(op, reference.linear_logprobs, inputs, torch.float32, **options)


@settings(max_examples=30, deadline=None)
@given(linear_problems(), st.sampled_from(["torch", "triton"]))
def test_softmax_laws(problem, backend):
    """Over all targets of one row the probabilities sum to 1; logp <= 0; 0 <= entropy <= log V."""
    inputs, options = problem
    vocab, width = inputs["weight"].shape
    if backend == "triton":
        vocab_cut = min(vocab, 64)
        inputs = {**inputs, "weight": inputs["weight"][:vocab_cut]}
        inputs.pop("bias", None)
        vocab = vocab_cut
    row = torch.randn(1, width, dtype=torch.float64).float().expand(vocab, width)
    bias = inputs["bias"].float() if "bias" in inputs else None
    logp, entropy = fastalign.linear_logprobs(
        row,
        inputs["weight"].float(),
        torch.arange(vocab),
        bias=bias,
        temperature=options["temperature"],
        softcap=options["softcap"],
        return_entropy=True,
        backend=backend,
    )
    assert (logp <= 1e-6).all()
    assert torch.logsumexp(logp.double(), 0).abs() < 1e-4
    assert (entropy >= 0).all() and (entropy <= math.log(vocab) + 1e-4).all()
    assert torch.allclose(entropy, entropy[0].expand_as(entropy))


@settings(max_examples=30, deadline=None)
@given(linear_problems(), st.floats(-50, 50))
def test_bias_shift_invariance(problem, shift):
    """Adding a constant to every logit changes nothing (without softcap, which is not shift-invariant)."""
    inputs, options = problem
    bias = inputs.get("bias", torch.zeros(inputs["weight"].shape[0], dtype=torch.float64))
    common = {"hidden": inputs["hidden"], "weight": inputs["weight"], "targets": inputs["targets"]}
    kwargs = {"temperature": options["temperature"], "return_entropy": True}
    logp, entropy = fastalign.linear_logprobs(**common, bias=bias, **kwargs)
    logp_shifted, entropy_shifted = fastalign.linear_logprobs(**common, bias=bias + shift, **kwargs)
    torch.testing.assert_close(logp_shifted, logp, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(entropy_shifted, entropy, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(linear_problems(), st.sampled_from(["torch", "triton"]))
def test_cross_entropy_is_mean_negative_logprob(problem, backend):
    inputs, options = problem
    if backend == "triton":
        inputs = {k: v[:64] if k in ("weight", "bias") else v for k, v in inputs.items()}
        inputs["targets"] = torch.where(inputs["targets"] >= 64, -100, inputs["targets"])
    floats = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    loss = fastalign.linear_cross_entropy(**floats, softcap=options["softcap"], backend=backend)
    logp = fastalign.linear_logprobs(**floats, softcap=options["softcap"], backend=backend)
    kept = (inputs["targets"] != -100).sum()
    expected = -logp.sum() / kept if kept > 0 else torch.tensor(0.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocabulary_of_one(backend):
    logp, entropy = fastalign.linear_logprobs(
        torch.randn(3, 4), torch.randn(1, 4), torch.zeros(3, dtype=torch.long), return_entropy=True, backend=backend
    )
    assert torch.equal(logp, torch.zeros(3)) and torch.equal(entropy, torch.zeros(3))
