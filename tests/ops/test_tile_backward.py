"""The Triton backend's tile backward (``fastalign.set_linear_backward("tiles")``, ``linear_grad_tiles_kernel``):
every gradient against the float64 reference in its atomic and its deterministic mode, the filter's error
bound, the launch order its tickets rely on, and the option's checks."""

import functools

import pytest
import torch
import triton
import triton.language as tl
from helpers.linear_inputs import make_linear_inputs, tolerance
from helpers.oracle import assert_matches_reference

import fastalign
from fastalign.kernels.triton.softmax_tile import grouped_tile
from fastalign.ops import dispatch, reference

MODES = [pytest.param({}, id="atomic"), pytest.param({"deterministic": True}, id="deterministic")]
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16)]


@pytest.fixture
def linear_backward():
    """``set_linear_backward`` for one test, the default restored afterwards."""
    yield fastalign.set_linear_backward
    fastalign.set_linear_backward(None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        {"with_bias": True, "return_entropy": True, "softcap": 3.0, "temperature": 0.7},
        {"return_entropy": True},
    ],
    ids=["bias-entropy-softcap-temperature", "entropy"],
)
def test_linear_logprobs_against_float64(linear_backward, mode, dtype, case):
    linear_backward("tiles", **mode)
    options = dict(case)
    inputs = make_linear_inputs((2, 19), 40, 101, with_bias=options.pop("with_bias", False))
    op = functools.partial(fastalign.linear_logprobs, backend="triton")
    assert_matches_reference(op, reference.linear_logprobs, inputs, dtype, **tolerance("triton", dtype), **options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "case",
    [{"label_smoothing": 0.1, "with_bias": True}, {"z_loss": 1e-2, "softcap": 3.0}],
    ids=["ls-bias", "z-softcap"],
)
def test_linear_cross_entropy_against_float64(linear_backward, mode, case):
    linear_backward("tiles", **mode)
    options = dict(case)
    inputs = make_linear_inputs((37,), 24, 70, with_bias=options.pop("with_bias", False))
    op = functools.partial(fastalign.linear_cross_entropy, backend="triton")
    assert_matches_reference(
        op, reference.linear_cross_entropy, inputs, torch.float32, **tolerance("triton", torch.float32), **options
    )


def _gradients(inputs, upstream, dtype=torch.float32, **kwargs):
    hidden = inputs["hidden"].to(dtype).requires_grad_()
    weight = inputs["weight"].to(dtype).requires_grad_()
    logp = fastalign.linear_logprobs(hidden, weight, inputs["targets"], backend="triton", **kwargs)
    (logp.double() * upstream).sum().backward()
    return logp.detach().double(), hidden.grad.double(), weight.grad.double()


@pytest.mark.parametrize("mode", MODES)
def test_last_group_short_and_one_hidden_gradient_only(linear_backward, mode):
    """19 token tiles of the interpreter's 16 rows: a group of 16 and a short one of 3 (the programs past the last
    token tile return without touching a ticket); and a call that needs only d_hidden."""
    linear_backward("tiles", **mode)
    inputs = make_linear_inputs((16 * 19 - 5,), 12, 70, seed=3)
    upstream = torch.randn(inputs["targets"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = _gradients(inputs, upstream)
    hidden = inputs["hidden"].clone().requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    (reference.linear_logprobs(hidden, weight, inputs["targets"]) * upstream).sum().backward()
    for value, expected in zip(got[1:], (hidden.grad, weight.grad), strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)

    hidden32 = inputs["hidden"].float().requires_grad_()
    logp = fastalign.linear_logprobs(hidden32, inputs["weight"].float(), inputs["targets"], backend="triton")
    (logp.double() * upstream).sum().backward()
    torch.testing.assert_close(hidden32.grad.double(), hidden.grad, rtol=1e-5, atol=1e-5)


def test_filter_error_is_bounded_and_it_skips(linear_backward):
    """A tile skipped by ``grad_filter = τ`` has every ``|g| ≤ τ``, so each gradient entry moves by at most
    ``τ · Σ |other operand|`` over the skipped tiles' rows or columns; with this τ some tiles are skipped (the
    result differs from the exact mode) and with a huge one all are (zero gradients, same log-probs)."""
    gen = torch.Generator().manual_seed(5)
    inputs = make_linear_inputs((45,), 16, 200, seed=5, ignore_every=0)
    # Peaked rows: most of the vocabulary's probabilities are tiny, as in a trained model.
    inputs["weight"] = inputs["weight"] * 4
    upstream = torch.randn(45, generator=gen, dtype=torch.float64)
    exact = _gradients(inputs, upstream)
    tau = 1e-3
    linear_backward("tiles", grad_filter=tau)
    filtered = _gradients(inputs, upstream)
    torch.testing.assert_close(filtered[0], exact[0], rtol=0, atol=0)
    bound_hidden = tau * inputs["weight"].abs().sum(0).expand(45, -1)  # over every column: a superset of skipped
    bound_weight = tau * inputs["hidden"].abs().sum(0).expand(200, -1)
    slack = 1e-5
    assert ((filtered[1] - exact[1]).abs() <= bound_hidden + slack).all()
    assert ((filtered[2] - exact[2]).abs() <= bound_weight + slack).all()
    assert not torch.equal(filtered[2], exact[2]), "no tile was skipped: the test proves nothing"

    linear_backward("tiles", grad_filter=1e9)
    everything_skipped = _gradients(inputs, upstream)
    torch.testing.assert_close(everything_skipped[0], exact[0], rtol=0, atol=0)
    assert not everything_skipped[1].any() and not everything_skipped[2].any()


def test_exact_mode_skips_only_zero_tiles(linear_backward):
    """The default filter (0.0) skips a tile only when its gradient is all zeros: ignored rows' tiles, here."""
    inputs = make_linear_inputs((40,), 16, 70, seed=6, ignore_every=0)
    inputs["targets"][:16] = -100  # the first token tile: no gradient at all
    upstream = torch.randn(40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    slabs = _gradients(inputs, upstream)
    linear_backward("tiles")
    tiles = _gradients(inputs, upstream)
    assert not tiles[1][:16].any()
    for value, expected in zip(tiles, slabs, strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


@triton.jit
def _record_order(token_ptr, vocab_ptr, n_vocab_tiles, GROUP_N: tl.constexpr):
    program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    token_tile, vocab_tile = grouped_tile(program, n_vocab_tiles, GROUP_N)
    tl.store(token_ptr + program, token_tile)
    tl.store(vocab_ptr + program, vocab_tile)


@pytest.mark.parametrize(("token_tiles", "vocab_tiles", "group"), [(19, 5, 16), (7, 3, 2), (4, 9, 16), (5, 4, 1)])
def test_ticket_order_is_program_order(token_tiles, vocab_tiles, group):
    """What the deterministic mode's tickets need: every (token tile, vocabulary tile) once, and for a fixed token
    tile the vocabulary tiles in increasing program order (turns 0, 1, ...), and the same for a fixed vocabulary
    tile's token tiles; every program a ticket waits for has a lower number, so none can wait in a cycle."""
    grid = (group * vocab_tiles, triton.cdiv(token_tiles, group))
    programs = grid[0] * grid[1]
    tokens, vocab = (torch.full((programs,), -1, dtype=torch.int32) for _ in range(2))
    _record_order[grid](tokens, vocab, vocab_tiles, GROUP_N=group)
    pairs = [(t, v) for t, v in zip(tokens.tolist(), vocab.tolist(), strict=True) if t < token_tiles]
    assert sorted(pairs) == [(t, v) for t in range(token_tiles) for v in range(vocab_tiles)]
    for t in range(token_tiles):
        assert [v for tt, v in pairs if tt == t] == list(range(vocab_tiles))
    for v in range(vocab_tiles):
        assert [t for t, vv in pairs if vv == v] == list(range(token_tiles))


def test_options_are_checked(linear_backward, monkeypatch):
    with pytest.raises(ValueError, match="design must be one of 'slabs', 'tiles'; got 'fused'"):
        linear_backward("fused")
    with pytest.raises(ValueError, match="grad_filter must be"):
        linear_backward("tiles", grad_filter=-1.0)
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        linear_backward("tiles", deterministic=1)
    with pytest.raises(ValueError, match="options of design='tiles'"):
        linear_backward("slabs", grad_filter=1e-3)
    with pytest.raises(ValueError, match="takes no grad_filter"):
        linear_backward(None, deterministic=True)
    monkeypatch.setenv("FASTALIGN_LINEAR_BACKWARD", "tiles")
    assert dispatch.tile_backward() == dispatch.TileBackward(0.0, False)
    linear_backward("slabs")  # a call wins over the environment
    assert dispatch.tile_backward() is None
    linear_backward("tiles", grad_filter=0.5, deterministic=True)
    assert dispatch.tile_backward() == dispatch.TileBackward(0.5, True)
    linear_backward(None)
    monkeypatch.setenv("FASTALIGN_LINEAR_BACKWARD", "tile")
    with pytest.raises(ValueError, match="FASTALIGN_LINEAR_BACKWARD must be one of 'slabs', 'tiles'; got 'tile'"):
        dispatch.tile_backward()


def test_only_the_triton_linear_ops_take_it(linear_backward):
    """The torch backend has one backward: its results do not change with the Triton backend's choice."""
    inputs = make_linear_inputs((9,), 8, 30)
    hidden, weight, targets = inputs["hidden"], inputs["weight"], inputs["targets"]
    before = fastalign.linear_logprobs(hidden, weight, targets, backend="torch")
    linear_backward("tiles", grad_filter=1e9)
    h = hidden.clone().requires_grad_()
    fastalign.linear_logprobs(h, weight, targets, backend="torch").sum().backward()
    assert h.grad.abs().sum() > 0
    torch.testing.assert_close(fastalign.linear_logprobs(hidden, weight, targets, backend="torch"), before)
