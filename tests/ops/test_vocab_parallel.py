"""Vocabulary-parallel linear_logprobs / linear_cross_entropy on CPU (gloo, 2 and 3 processes) against the
single-process ops on the full weight: outputs, d_hidden on every rank, d_weight / d_bias shards, error cases.

Each world size is spawned once; its workers run every case and save their results, which the tests then check.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastalign
from fastalign.ops import reference

VOCAB = 37  # not divisible by 2 or 3
WIDTH = 16
IGNORE = -100

# name -> (op, dtype, keyword arguments, options of the test inputs)
CASES = {
    "logp_entropy_softcap_temperature_bias_f64": (
        "logprobs", torch.float64, {"temperature": 0.7, "softcap": 4.0, "return_entropy": True}, {"bias": True},
    ),
    "logp_custom_ignore_index_f32": ("logprobs", torch.float32, {"ignore_index": -1}, {"ignore": -1}),
    "logp_entropy_large_logits_f32": ("logprobs", torch.float32, {"return_entropy": True}, {"scale": 40.0}),
    "targets_on_one_shard_reversed_layout_f64": (
        "logprobs", torch.float64, {"return_entropy": True}, {"layout": "reversed", "targets": "last_rank"},
    ),
    "ce_mean_smoothing_zloss_bias_f64": (
        "ce", torch.float64, {"reduction": "mean", "label_smoothing": 0.1, "z_loss": 1e-3}, {"bias": True},
    ),
    "ce_sum_softcap_f32": ("ce", torch.float32, {"reduction": "sum", "softcap": 3.0}, {}),
    "ce_none_smoothing_f64": ("ce", torch.float64, {"reduction": "none", "label_smoothing": 0.2}, {"bias": True}),
    "ce_mean_all_ignored_f64": ("ce", torch.float64, {"reduction": "mean", "z_loss": 1e-2}, {"ignore": "all"}),
    "logp_no_grad_f32": ("logprobs", torch.float32, {"return_entropy": True}, {"no_grad": True}),
    # The Triton kernels (in triton's CPU interpreter) take the global maximum and log-sum in their backward too.
    "logp_entropy_triton_bias_f32": (
        "logprobs", torch.float32, {"return_entropy": True, "softcap": 4.0, "backend": "triton"}, {"bias": True},
    ),
}  # fmt: skip


def _shards(world: int, layout: str = "ranked") -> list[tuple[int, int]]:
    """``(vocab_start, V_local)`` per rank: sizes as even as possible; "reversed" gives rank 0 the top block."""
    sizes = [VOCAB // world + (r < VOCAB % world) for r in range(world)]
    if layout == "reversed":
        sizes = sizes[::-1]
    starts = [sum(sizes[:r]) for r in range(world)]
    shards = list(zip(starts, sizes, strict=True))
    return shards[::-1] if layout == "reversed" else shards


def _inputs(name: str, world: int):
    """The case's full inputs (the same in every process): hidden, weight, bias, targets, upstream gradients."""
    _, dtype, _, spec = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    hidden = torch.randn(3, 5, WIDTH, generator=gen, dtype=torch.float64) * spec.get("scale", 1.0) / WIDTH**0.5
    weight = torch.randn(VOCAB, WIDTH, generator=gen, dtype=torch.float64)
    bias = torch.randn(VOCAB, generator=gen, dtype=torch.float64) if spec.get("bias") else None
    if spec.get("targets") == "last_rank":
        # Only the last rank's shard holds targets (with the reversed layout it is [0, V_local)).
        start, size = _shards(world, spec.get("layout", "ranked"))[-1]
        targets = torch.randint(start, start + size, (3, 5), generator=gen)
    else:
        targets = torch.randint(0, VOCAB, (3, 5), generator=gen)
    ignore = spec.get("ignore", IGNORE)
    if ignore == "all":
        targets.fill_(IGNORE)
    else:
        targets[0, :2] = ignore
    upstream = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    cast = [None if t is None else t.to(dtype) for t in (hidden, weight, bias, *upstream)]
    return cast[0], cast[1], cast[2], targets, cast[3:]


def _run(name: str, hidden, weight, bias, targets, upstream, **parallel):
    """Outputs of the case's op and (unless no_grad) the gradients of a loss mixing all of them."""
    op, _, kwargs, spec = CASES[name]
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    fn = fastalign.linear_logprobs if op == "logprobs" else fastalign.linear_cross_entropy
    with torch.set_grad_enabled(not spec.get("no_grad")):
        out = fn(hidden, weight, targets, bias=bias, **{"backend": "torch", **kwargs}, **parallel)
    outputs = out if isinstance(out, tuple) else (out,)
    if not spec.get("no_grad"):
        # Random upstream weights exercise every coefficient of the backward (not only d/d sum).
        loss = sum((o * u).sum() if o.dim() else o * 1.7 for o, u in zip(outputs, upstream, strict=False))
        loss.backward()
    return {
        "outputs": [o.detach() for o in outputs],
        "grads": [None if t is None else t.grad for t in (hidden, weight, bias)],
    }


def _error_cases(rank: int, world: int) -> dict[str, str | None]:
    """Message of the ValueError each bad call raises on this rank (None if it raised nothing)."""
    hidden, weight, _, targets, _ = _inputs("logp_custom_ignore_index_f32", world)
    start, size = _shards(world)[rank]
    shard = weight[start : start + size]
    group = dist.group.WORLD
    too_large = targets.clone()
    too_large[1, 1] = VOCAB
    calls = {
        "negative_vocab_start": dict(process_group=group, vocab_start=-1),
        "float_vocab_start": dict(process_group=group, vocab_start=1.5),
        "bool_vocab_start": dict(process_group=group, vocab_start=True),
        "overlapping_shards": dict(process_group=group, vocab_start=0),
        "gap_between_shards": dict(process_group=group, vocab_start=start + rank),
        "not_a_group": dict(process_group="world", vocab_start=start),
        "vocab_start_without_group": dict(vocab_start=start + 1),
        "target_beyond_global_vocab": dict(process_group=group, vocab_start=start, targets=too_large),
    }
    messages = {}
    for name, kwargs in calls.items():
        call_targets = kwargs.pop("targets", targets)
        try:
            fastalign.linear_logprobs(hidden, shard, call_targets, backend="torch", **kwargs)
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        results = {}
        for name, (_, _, _, spec) in CASES.items():
            hidden, weight, bias, targets, upstream = _inputs(name, world)
            start, size = _shards(world, spec.get("layout", "ranked"))[rank]
            results[name] = _run(
                name, hidden, weight[start : start + size], None if bias is None else bias[start : start + size],
                targets, upstream, process_group=dist.group.WORLD, vocab_start=start,
            )  # fmt: skip
        results["errors"] = _error_cases(rank, world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    """Run every case in ``world`` gloo processes; returns ``(world, [results of rank 0, 1, ...])``."""
    out_dir = tmp_path_factory.mktemp(f"world{request.param}")
    mp.spawn(_worker, args=(request.param, _free_port(), str(out_dir)), nprocs=request.param, join=True)
    return request.param, [torch.load(out_dir / f"rank{r}.pt") for r in range(request.param)]


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_on_every_rank(world, name):
    world_size, results = world
    _, dtype, _, spec = CASES[name]
    hidden, weight, bias, targets, upstream = _inputs(name, world_size)
    full = _run(name, hidden, weight, bias, targets, upstream)
    tol = _tolerance(dtype)
    for rank, (start, size) in enumerate(_shards(world_size, spec.get("layout", "ranked"))):
        got = results[rank][name]
        for out, expected in zip(got["outputs"], full["outputs"], strict=True):
            assert out.dtype == expected.dtype and out.shape == expected.shape
            torch.testing.assert_close(out, expected, **tol)
        # Every rank computes exactly the same outputs from the same gathered statistics.
        for out, first in zip(got["outputs"], results[0][name]["outputs"], strict=True):
            assert torch.equal(out, first), f"rank {rank} differs from rank 0"
        grad_hidden, grad_weight, grad_bias = got["grads"]
        full_hidden, full_weight, full_bias = full["grads"]
        if spec.get("no_grad"):
            assert grad_hidden is None and grad_weight is None
            continue
        torch.testing.assert_close(grad_hidden, full_hidden, **tol)  # the full gradient on every rank
        torch.testing.assert_close(grad_weight, full_weight[start : start + size], **tol)
        if bias is not None:
            torch.testing.assert_close(grad_bias, full_bias[start : start + size], **tol)


def test_all_ignored_gives_zero_loss_and_gradients(world):
    _, results = world
    for rank_results in results:
        got = rank_results["ce_mean_all_ignored_f64"]
        assert got["outputs"][0].item() == 0.0
        assert all(bool((g == 0).all()) for g in got["grads"] if g is not None)


def test_large_logits_as_accurate_as_single_process(world):
    """float32 with logits of order 100: the parallel combination adds no error beyond the single process's."""
    world_size, results = world
    name = "logp_entropy_large_logits_f32"
    hidden, weight, _, targets, _ = _inputs(name, world_size)
    exact = reference.linear_logprobs(hidden.double(), weight.double(), targets, return_entropy=True)
    single = fastalign.linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert (hidden @ weight.T).abs().max() > 50
    for out, ref, one in zip(results[0][name]["outputs"], exact, single, strict=True):
        parallel_error = (out.double() - ref).abs().max().item()
        single_error = (one.double() - ref).abs().max().item()
        assert parallel_error <= 2 * single_error + 1e-5, (parallel_error, single_error)


def test_cross_entropy_matches_eager_full_logits(world):
    """An independent check of the parallel loss: eager F.cross_entropy on the full logits (float64)."""
    world_size, results = world
    name = "ce_mean_smoothing_zloss_bias_f64"
    hidden, weight, bias, targets, _ = _inputs(name, world_size)
    expected = reference.linear_cross_entropy(hidden, weight, targets, bias=bias, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(results[-1][name]["outputs"][0], expected, rtol=1e-10, atol=1e-12)


def test_bad_arguments_raise_on_every_rank(world):
    world_size, results = world
    expected = {
        "negative_vocab_start": "vocab_start must be an int >= 0",
        "float_vocab_start": "vocab_start must be an int >= 0",
        "bool_vocab_start": "vocab_start must be an int >= 0",
        "overlapping_shards": "an overlap at id",
        "gap_between_shards": "a gap at id",
        "not_a_group": "process_group must be a torch.distributed.ProcessGroup",
        "vocab_start_without_group": "needs a process_group",
        "target_beyond_global_vocab": f"targets must lie in [0, {VOCAB})",
    }
    for rank, rank_results in enumerate(results):
        for name, fragment in expected.items():
            message = rank_results["errors"][name]
            assert message is not None, f"{name} raised nothing on rank {rank} of {world_size}"
            assert fragment in message, (name, message)


def test_process_group_without_initialised_distributed():
    assert not dist.is_initialized()
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"torch\.distributed is not initialised"):
        fastalign.linear_logprobs(hidden, weight, targets, process_group=object(), vocab_start=0)


def test_group_of_one_is_bit_identical_to_no_group(tmp_path):
    """A world of 1 runs the parallel path (gather, combination, all-reduce) and must change no bit."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        for name in ("logp_entropy_softcap_temperature_bias_f64", "ce_mean_smoothing_zloss_bias_f64",
                     "ce_sum_softcap_f32"):  # fmt: skip
            hidden, weight, bias, targets, upstream = _inputs(name, 1)
            alone = _run(name, hidden, weight, bias, targets, upstream)
            grouped = _run(name, hidden, weight, bias, targets, upstream, process_group=group, vocab_start=0)
            for a, b in zip(alone["outputs"] + alone["grads"], grouped["outputs"] + grouped["grads"], strict=True):
                assert (a is None and b is None) or torch.equal(a, b), name
    finally:
        dist.destroy_process_group()


def test_scaling_benchmark_smoke(tmp_path, capsys):
    """bench/scaling.py end to end at toy sizes: rows, exact collective sizes, agreement with world size 1."""
    from bench.scaling import main

    tokens, width, vocab = 16, 8, 50
    output = tmp_path / "scaling.md"
    rows = main(["--world_sizes", "2", "1", "--tokens", str(tokens), "--hidden", str(width), "--vocab", str(vocab),
                 "--repeats", "1", "--output", str(output)])  # fmt: skip
    assert [row["world_size"] for row in rows] == [1, 2]
    # Per step: the shard-layout check (2 int64), the statistics (4 float32 rows of N + the shard size), d_hidden.
    expected = [["all_gather", 2 * 8], ["all_gather", (4 * tokens + 1) * 4], ["all_reduce", tokens * width * 4]]
    for row in rows:
        assert [list(call) for call in row["calls"]] == expected
        assert row["payload_bytes"] == sum(size for _, size in expected)
        assert row["time_ms"] > 0 and row["peak_extra_mib"] >= 0
    assert rows[0]["ring_bytes_sent"] == 0
    assert rows[1]["ring_bytes_sent"] == 16 + (4 * tokens + 1) * 4 + tokens * width * 4  # (R-1) = 2(R-1)/R = 1
    assert rows[1]["v_local"] == vocab // 2
    assert max(rows[1]["max_diff"].values()) < 1e-5
    text = output.read_text()
    assert "| 1 | 50 |" in text and "| 2 | 25 |" in text and "all_reduce 512 B" in text
