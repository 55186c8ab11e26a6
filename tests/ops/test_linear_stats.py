"""fastalign.ops.logprobs.linear_stats(need_top1=True): whether the target is the row's most likely token, from
the same sweep as the other statistics, against eager full logits (float64) on every backend that runs here."""

import pytest
import torch

from fastalign.ops.logprobs import linear_stats

BACKEND_DTYPES = [
    ("torch", torch.float32),
    ("torch", torch.bfloat16),
    ("torch", torch.float64),
    ("triton", torch.float32),
    ("triton", torch.bfloat16),
]


def full_logits(hidden, weight, bias=None, temperature=1.0, softcap=None) -> torch.Tensor:
    """The transformed logits ``[N, V]`` in float64, from the inputs' own (rounded) values."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize(
    "options", [{}, {"temperature": 0.7, "softcap": 4.0}, {"with_bias": True}], ids=["plain", "tempcap", "bias"]
)
def test_is_top1_is_argmax_of_the_full_logits(backend, dtype, options, scratch_budget):
    """Random inputs, half the targets the argmax: is_top1 == (argmax == target), False where ignored; the other
    statistics and their gradient are those of need_top1=False."""
    options = dict(options)
    with_bias = options.pop("with_bias", False)
    scratch_budget(4096)  # the torch backend visits the vocabulary in several tiles
    gen = torch.Generator().manual_seed(0)
    n, width, vocab = 37, 24, 83  # not multiples of any block size
    hidden = torch.randn(n, width, generator=gen).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) / 2).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    logits = full_logits(hidden, weight, bias, **options)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near-tie that rounding could flip
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::2] = logits.argmax(-1)[::2]
    targets[5::7] = -100
    valid = targets != -100
    expected = (logits.argmax(-1) == targets) & valid
    assert expected.any() and not expected[valid].all()

    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    stats, prepared = linear_stats(
        *leaves, bias, targets, need_entropy=True, need_sum=False, need_top1=True, backend=backend, **options
    )
    assert len(stats) == 5
    is_top1 = stats[4]
    assert is_top1.dtype == torch.bool and is_top1.shape == (n,) and not is_top1.requires_grad
    assert torch.equal(is_top1, expected)

    plain_leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    plain, _ = linear_stats(*plain_leaves, bias, targets, need_entropy=True, need_sum=False, backend=backend, **options)
    assert len(plain) == 4
    for got, want in zip(stats[:4], plain, strict=True):
        assert torch.equal(got, want)
    upstream = torch.randn(n, generator=gen, dtype=stats[1].dtype)
    for outputs in (stats, plain):
        (prepared.finish(outputs[1]) * upstream + prepared.finish(outputs[2]) * upstream.flip(0)).sum().backward()
    for got, want in zip(leaves, plain_leaves, strict=True):
        assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_is_top1_with_exact_ties(backend, dtype, scratch_budget):
    """Small-integer inputs make every logit exact in every dtype and the row maxima often tied. A target whose
    logit equals the row maximum counts as top-1, the first of the tied columns (TRL's ``argmax == label``) and a
    later one alike; a target below the maximum does not."""
    scratch_budget(4096)
    gen = torch.Generator().manual_seed(1)
    n, width, vocab = 60, 4, 45
    hidden = torch.randint(-2, 3, (n, width), generator=gen).to(dtype)
    weight = torch.randint(-2, 3, (vocab, width), generator=gen).to(dtype)
    logits = full_logits(hidden, weight, temperature=0.5)
    is_max = logits == logits.amax(-1, keepdim=True)
    tied_rows = is_max.sum(-1) > 1
    assert tied_rows.sum() >= 10
    first_max = is_max.int().argmax(-1)  # argmax's choice: the first tied column
    last_max = vocab - 1 - is_max.flip(-1).int().argmax(-1)
    below_max = (~is_max).int().argmax(-1)  # some column below the maximum (no row is constant)
    targets = torch.stack([first_max, last_max, below_max], 1)[torch.arange(n), torch.arange(n) % 3]
    expected = logits.gather(1, targets[:, None])[:, 0] == logits.amax(-1)
    # Every kind of row is there: ties where the target is the first maximum, a later one, and not a maximum.
    later_tie = targets != logits.argmax(-1)
    assert (expected & tied_rows & ~later_tie).any() and (expected & later_tie).any() and (~expected).any()

    stats, _ = linear_stats(
        hidden,
        weight,
        None,
        targets,
        need_entropy=False,
        need_sum=False,
        need_top1=True,
        backend=backend,
        temperature=0.5,
    )
    assert torch.equal(stats[4], expected)


def test_is_top1_empty_and_refused_options():
    weight = torch.randn(11, 8)
    stats, _ = linear_stats(
        torch.randn(0, 8),
        weight,
        None,
        torch.zeros(0, dtype=torch.long),
        need_entropy=False,
        need_sum=False,
        need_top1=True,
        backend="torch",
    )
    assert stats[4].shape == (0,) and stats[4].dtype == torch.bool
    common = {"need_entropy": False, "need_sum": False, "backend": "torch"}
    with pytest.raises(ValueError, match="need_top1 must be a bool"):
        linear_stats(torch.randn(3, 8), weight, None, torch.zeros(3, dtype=torch.long), need_top1=1, **common)
    with pytest.raises(ValueError, match="need_top1=True is not supported with a process_group"):
        linear_stats(
            torch.randn(3, 8),
            weight,
            None,
            torch.zeros(3, dtype=torch.long),
            need_top1=True,
            process_group=object(),
            **common,
        )
