"""bench/roofline.py: its FLOP counts, the L2 model's hit-or-HBM decisions, the roofline time, today's design
against issue 14's figures, the parameters it takes from the backend, the command line, and that the committed
table is what the tool prints."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from bench import roofline
from bench.roofline import ATOMIC, READ, UPDATE, WRITE, Design, KernelCost, Problem, Traffic, replay

ROOT = Path(__file__).resolve().parents[2]
H100 = roofline.MACHINES["h100"]
# An L2 that holds everything: the traffic must be each tensor's bytes once.
HUGE_L2 = replace(H100, l2_bytes=1 << 40)
# A small shape that still has several backward slabs (a 4 MiB budget: 2048 columns) and edge tiles everywhere:
# 1000 tokens (64- and 128-row blocks), D = 192 (64- and 128-column blocks), V = 9000 (a last slab of 808 columns).
SMALL = Problem(1000, 192, 9000, "bf16", scratch_bytes=4 << 20)


def kernel(design_kernels, prefix: str) -> KernelCost:
    (found,) = [k for k in design_kernels if k.name.startswith(prefix)]
    return found


# --- FLOP


@pytest.mark.parametrize(
    ("build", "logit_passes"),
    [
        (roofline.old_design, 4),  # forward, recomputed in the backward, and both gradient matmuls
        (roofline.old_fused_loss_design, 3),
        (roofline.fused_loss_design, 3),
        (roofline.fused_2d_design, 4),
        (roofline.grad_in_forward_design, 3),
        (roofline.trl_chunked_design, 4),
        (roofline.bare_gemm_reference, 3),
    ],
)
def test_every_matmul_kernel_does_2ndv_and_the_designs_add_up(build, logit_passes):
    design = build(SMALL, HUGE_L2)
    ndv = SMALL.tokens * SMALL.width * SMALL.vocab
    assert design.flops == 2 * logit_passes * ndv
    per_kernel = sorted(k.flops / (2 * ndv) for k in design.kernels if k.flops)
    # one pass per kernel, the fused backward (recompute + both dots in one kernel) three
    assert per_kernel == ([1, 3] if build is roofline.fused_2d_design else [1] * logit_passes)


@pytest.mark.parametrize(("chunk", "bound"), [(1024, "HBM"), (2048, "compute")])
def test_fused_loss_weight_update_is_compute_bound_from_four_times_the_machine_balance(chunk, bound):
    """Each chunk reads and writes the float32 d_weight (8·V·D bytes) for 2·chunk·V·D FLOP: compute-bound once
    chunk ≥ 4 × peak / bandwidth tokens (1181 on an H100), whatever V and D (d_weight here 128 MiB: not in L2)."""
    assert 1024 < 4 * H100.peak_flops("bf16") / H100.hbm_bandwidth < 2048
    p = Problem(8192, 1024, 32768, "bf16", scratch_bytes=chunk * 32768 * 2)
    design = roofline.fused_loss_design(p, H100)
    update = kernel(design.kernels, "fwd: d_weight fp32")
    assert update.launches == 8192 // chunk
    assert update.bound(H100, "bf16") == bound
    # the first chunk writes d_weight, every later one reads it too; the grad and rows panels come once
    weight32 = 4 * 32768 * 1024
    assert update.traffic.hbm_bytes == pytest.approx(
        weight32 * (2 * update.launches - 1) + 8192 * 32768 * 2 + 8192 * 1024 * 2, rel=0.02
    )


def test_the_old_backward_sums_its_slabs():
    widths = roofline.slab_widths(SMALL)
    assert widths == [2048, 2048, 2048, 2048, 808]
    grad = kernel(roofline.old_backward(SMALL, H100), "bwd: linear_grad_logits_kernel")
    assert grad.launches == 5
    assert grad.flops == 2 * SMALL.tokens * SMALL.width * SMALL.vocab


# --- the L2 model


def test_a_reread_hits_only_when_the_distinct_bytes_since_fit():
    # Two programs, each reading its own 10-byte tile in two steps.
    programs = [[(("x", i, 10),), (("x", i, 10),)] for i in range(2)]
    modes = {"x": READ}
    assert replay(programs, modes, concurrent=2, l2_bytes=20).hbm_read == 20  # the wave's 20 bytes fit: one read each
    assert replay(programs, modes, concurrent=2, l2_bytes=19).hbm_read == 40  # they do not: both re-read
    assert replay(programs, modes, concurrent=1, l2_bytes=10).hbm_read == 20  # one at a time: the distance is 10


def test_a_tile_shared_by_a_wave_step_comes_from_hbm_once():
    programs = [[(("weight", 0, 100), ("hidden", i, 10))] for i in range(4)]
    modes = {"weight": READ, "hidden": READ}
    # One wave: the shared tile once, even with an L2 too small to keep anything (the lockstep assumption).
    assert replay(programs, modes, concurrent=4, l2_bytes=1).hbm_read == 100 + 4 * 10
    # A wave per program and an L2 that cannot keep the shared tile: fetched by every wave.
    assert replay(programs, modes, concurrent=1, l2_bytes=50).hbm_read == 4 * (100 + 10)
    # ... and one that can: fetched once.
    assert replay(programs, modes, concurrent=1, l2_bytes=110).hbm_read == 100 + 4 * 10


def test_writes_go_to_hbm_once_per_eviction_and_updates_fetch_first():
    twice = [[(("out", 0, 8),), (("out", 0, 8),)]]
    assert replay(twice, {"out": WRITE}, 1, 64) == Traffic(0, 8, 0, (("out", 0, 8, 8),))  # no fetch, one write back
    # Written, evicted by another tile (written back), written again (written back at the end).
    evicting = [[(("out", 0, 8),), (("out", 1, 8),), (("out", 0, 8),)]]
    assert replay(evicting, {"out": WRITE}, 1, 8).hbm_written == 24
    updates = [[(("acc", 0, 8),)]] * 3
    updated = replay(updates, {"acc": UPDATE}, 3, 64)
    assert (updated.hbm_read, updated.hbm_written) == (8, 8)  # fetched once, written back once
    # Atomics: the same HBM traffic as an update, and every program's operands reach the L2.
    atomics = replay(updates, {"acc": ATOMIC}, 3, 64)
    assert (atomics.hbm_read, atomics.hbm_written, atomics.l2_atomic) == (8, 8, 24)


def test_traffic_is_the_unique_bytes_when_everything_fits_in_the_l2():
    n, d, v, s = SMALL.tokens, SMALL.width, SMALL.vocab, SMALL.itemsize
    hidden, weight = n * d * s, v * d * s
    slabs = len(roofline.slab_widths(SMALL))

    forward, _ = roofline.old_forward(SMALL, HUGE_L2)
    splits, _ = roofline.vocab_splits(n, v, H100.sms)
    assert (forward.traffic.hbm_read, forward.traffic.hbm_written) == (hidden + weight + 8 * n, 3 * 4 * splits * n)

    backward = roofline.old_backward(SMALL, HUGE_L2)
    grad = kernel(backward, "bwd: linear_grad_logits_kernel").traffic
    # every slab launch reads hidden and the row statistics once, its weight slab once, writes its gradient
    assert (grad.hbm_read, grad.hbm_written) == (slabs * (hidden + 20 * n) + weight, n * v * s)
    accumulate = kernel(backward, "bwd: matmul_accumulate_kernel").traffic
    assert (accumulate.hbm_read, accumulate.hbm_written) == (n * v * s + weight + slabs * 4 * n * d, slabs * 4 * n * d)
    weight_matmul = kernel(backward, "bwd: torch.mm").traffic
    assert (weight_matmul.hbm_read, weight_matmul.hbm_written) == (n * v * s + slabs * hidden, weight)

    fused_forward = roofline._fused_kernel(SMALL, HUGE_L2, backward=False).traffic
    token_tiles, vocab_tiles = roofline.cdiv(n, 128), roofline.cdiv(v, 256)
    assert (fused_forward.hbm_read, fused_forward.hbm_written) == (hidden + weight + 8 * n, 3 * 4 * n * vocab_tiles)
    fused_backward = roofline._fused_kernel(SMALL, HUGE_L2, backward=True).traffic
    accumulators = 4 * (n + v) * d
    assert fused_backward.hbm_read == hidden + weight + 20 * n + accumulators
    assert fused_backward.hbm_written == accumulators
    # every (token, vocabulary) tile adds its [rows + cols, D] float32 partials, fitting L2 or not
    assert fused_backward.l2_atomic == 4 * d * (n * vocab_tiles + v * token_tiles)


def test_residency_is_the_tightest_of_registers_shared_memory_threads_and_blocks():
    # the old kernels' tiles on sm_90: 8 warps at ~250 registers fill the register file
    assert roofline.programs_per_sm(250, 8, 160 * 1024, H100) == 1
    assert roofline.programs_per_sm(182, 8, 96 * 1024, H100) == 1  # 184 × 256 threads: 1.4 blocks' worth
    assert roofline.programs_per_sm(255, 4, 96 * 1024, H100) == 2  # 256 × 128 threads: 2; 96 KiB + 1 KiB: 2
    assert roofline.programs_per_sm(64, 4, 112 * 1024, H100) == 2  # shared memory: 228 // 113
    assert roofline.programs_per_sm(32, 8, 0, H100) == 8  # threads: 2048 // 256
    assert roofline.programs_per_sm(16, 1, 0, H100) == 32  # the block limit


def test_grouped_order_visits_every_tile_once_in_groups():
    order = list(roofline.grouped_order(5, 3, 2))
    assert sorted(order) == [(r, c) for r in range(5) for c in range(3)]
    assert order[:6] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert list(roofline.grouped_order(5, 3, 5)) == [(r, c) for c in range(3) for r in range(5)]  # axis 0 fastest
    assert list(roofline.grouped_order(5, 3, 1, rows_first=False)) == [(r, c) for c in range(3) for r in range(5)]


# --- time


def test_time_is_the_largest_of_compute_hbm_and_l2_atomics():
    millisecond_of_compute = H100.half_flops * 1e-3
    compute = KernelCost("compute", millisecond_of_compute, Traffic(1e9, 0.0))  # HBM: 0.3 ms
    memory = KernelCost("memory", millisecond_of_compute, Traffic(3.35e9, 3.35e9))  # HBM: 2 ms
    atomics = KernelCost("atomics", millisecond_of_compute, Traffic(0.0, 0.0, 3 * H100.l2_atomic_bandwidth * 1e-3))
    slower = KernelCost("at 50%", millisecond_of_compute, Traffic(), efficiency=0.5)
    expected = {"compute": (1e-3, "compute"), "memory": (2e-3, "HBM"), "atomics": (3e-3, "L2 atomics")}
    expected["at 50%"] = (2e-3, "compute (50% of peak)")
    for k in (compute, memory, atomics, slower):
        assert (k.seconds(H100, "bf16"), k.bound(H100, "bf16")) == pytest.approx(expected[k.name])
    assert Design("both", "", (compute, memory)).seconds(H100, "bf16") == pytest.approx(3e-3)  # back to back
    assert compute.seconds(H100, "fp32") == pytest.approx(1e-3 * H100.half_flops / H100.tf32_flops)


# --- today's design against issue 14


@pytest.fixture(scope="module")
def issue_designs():
    return [
        roofline.old_design(roofline.ISSUE_SHAPE, H100),
        roofline.old_fused_loss_design(roofline.ISSUE_SHAPE, H100),
    ]


# The issue's figures are back-of-envelope sums of the same terms the model counts (hidden re-read V/BLOCK_V times
# forward, the gradient slab re-read per column tile by matmul_accumulate_kernel, fused_linear_loss's weight reads
# and float32 d_weight read-modify-writes per chunk); the model lands within 5 % of each. The gap left: the model
# also counts the weight's re-reads where a vocabulary tile spans two waves (+2.9 GB forward, +1.2 GB per slab
# loop), and the d_weight matmul re-reading hidden per raster group (19 GB, where the issue counts its operands
# once, ~8 GB). 10 % holds every figure with room for those and fails on any change of the kernels' terms.
ISSUE_TOLERANCE = 0.10


@pytest.mark.parametrize("figure", list(roofline.ISSUE_FIGURES))
def test_old_design_reproduces_the_issue_figures(issue_designs, figure):
    expected, what = roofline.ISSUE_FIGURES[figure]
    value = roofline.model_figure(issue_designs, H100, "bf16", what)
    assert value == pytest.approx(expected, rel=ISSUE_TOLERANCE)


def test_old_design_rereads_hidden_per_column_tile_because_a_wave_overflows_the_l2(issue_designs):
    old = issue_designs[0]
    forward = old.kernels[0]
    # the autotuner's pick: the widest column tile re-reads least; the grid: the issue's 3 vocabulary splits
    assert forward.detail.startswith("64×256×64") and "grid 256×3," in forward.detail
    assert forward.traffic.passes("hidden") == 131072 / 256
    grad = kernel(old.kernels, "bwd: linear_grad_logits_kernel")
    assert grad.traffic.passes("hidden") == 8192 / 256  # per slab
    accumulate = kernel(old.kernels, "bwd: matmul_accumulate_kernel")
    assert accumulate.traffic.passes("grad slab") == pytest.approx(4096 / 128, rel=0.05)  # per column tile of d_hidden
    d_hidden = [(r, w) for name, r, w, _ in accumulate.traffic.tensors if name == "d_hidden fp32"]
    assert d_hidden == [(16 * 16384 * 4096 * 4, 16 * 16384 * 4096 * 4)]  # 8.6 GB: read and written per slab
    assert old.flops == 8 * 16384 * 4096 * 131072
    # With an L2 that holds all of hidden (128 MiB), the same kernel reads it once.
    roomy, _ = roofline.old_forward(roofline.ISSUE_SHAPE, replace(H100, l2_bytes=200 * roofline.MIB))
    assert roomy.traffic.passes("hidden") == 1


# --- parameters taken from the backend and from bench/aot.py


def test_compile_stats_cover_every_tile_and_give_bench_aots_residency():
    for kernel_name in roofline._TILE_LISTS:
        for dtype in roofline.DTYPE_BYTES:
            for tile in roofline.sm90_tiles(kernel_name, dtype):
                assert (kernel_name, roofline.DTYPE_KIND[dtype], tile) in roofline.COMPILE_STATS
    results = ROOT / "bench" / "results" / "aot-sm80-sm90.md"
    if not results.exists():
        pytest.skip("bench/results/aot-sm80-sm90.md is not in this checkout")
    row = re.compile(
        r"^\| (\w+) \| sm_90 \| \w=(\d+),\w=(\d+),\w=(\d+) w(\d+) s(\d+) \| (bf16|fp32-tf32) \| \w+ \| ok \| "
        r"(\d+) \| (\d+) \|"
    )
    compiled = {}
    for line in results.read_text().splitlines():
        if match := row.match(line):
            name, *tile, dtype, smem, regs = match.groups()
            compiled[(name, "half" if dtype == "bf16" else "tf32", tuple(int(x) for x in tile))] = (
                int(smem),
                int(regs),
            )

    def residency(key, stats):
        smem_kib, regs = stats
        return roofline.programs_per_sm(regs, key[2][3], smem_kib * 1024, H100)

    # Registers move by a few with every kernel edit; the programs per SM they allow are what the model uses.
    for key, stats in roofline.COMPILE_STATS.items():
        assert key in compiled, key
        assert residency(key, compiled[key]) == residency(key, stats), key


# --- the command line and the committed table


def test_command_line_writes_the_markdown(tmp_path, capsys):
    out = tmp_path / "roofline.md"
    roofline.main(["--tokens", "1000", "--hidden", "192", "--vocab", "9000", "--gpu", "h200", "--out", str(out)])
    text = out.read_text()
    assert "## H200 SXM" in text and "## H100 SXM" not in text
    designs = ("old", "old fused_linear_loss", "fused_linear_loss", "fused-fwd-2d", "grad-in-forward 6NDV")
    for design in (*designs, "trl-chunked 8NDV"):
        assert f"| **{design}** | **total**" in text
    # the least-work reference meets both targets, by definition, at ratio 1
    assert re.search(r"^\| 6NDV bound \| [\d.]+ \| 1× \| [\d.]+ \| 1× \| yes \|", text, re.MULTILINE)
    assert "against the issue's figures" not in text  # only at the issue's shape on H100
    with pytest.raises(SystemExit) as done:
        roofline.main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--tokens", "--hidden", "--vocab", "--dtype", "--gpu", "--out", "h100", "h200"):
        assert flag in help_text


@pytest.mark.slow
def test_committed_table_is_what_the_tool_prints():
    command = "python -m bench.roofline --out bench/results/roofline-h100.md"
    expected = roofline.report(roofline.ISSUE_SHAPE, list(roofline.MACHINES.values()), command)
    assert (ROOT / "bench" / "results" / "roofline-h100.md").read_text() == expected, f"stale: run `{command}`"
