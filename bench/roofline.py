"""``python -m bench.roofline``: an analytic HBM-traffic / FLOP / roofline-time model of the matmul-fused log-prob
kernels (``linear_logprobs`` forward+backward; ``linear_cross_entropy`` moves the same bytes), today's design
against candidate designs, on an H100 or H200. Nothing is measured: every figure follows from the launch grids,
tile sizes and launch orders below and from a small model of the L2 cache.

Designs (each a sequence of kernel launches, run back to back):

* ``old``: the autograd path as issue 14 describes it (commit 015da5a, before cbf993d), from its real parameters
  (``fastalign.ops._triton_backend``): the forward's grid ``(token blocks, vocabulary splits)`` with token blocks
  fastest and that commit's split count (``vocab_splits``), each program walking its split tile by tile; the
  backward's slabs of columns sized by the 256 MiB scratch budget, per slab the gradient kernel (recomputes the
  logits, writes a bf16 ``[N, slab]`` gradient), ``matmul_accumulate_kernel`` (float32 ``d_hidden += grad @
  weight[slab]``) and ``torch.mm`` for ``d_weight[slab]``. Triton tiles are the sm_90 lists of
  ``fastalign.kernels.triton.linear_stats``; the autotuner is credited with the tile this model predicts fastest.
* ``grouped``: the same kernels in the grouped launch order the backend now uses (``split_tile`` /
  ``slab_tile`` / ``matmul_accumulate_kernel``: groups of ``GROUP_TOKEN_BLOCKS`` token blocks by every split or
  column tile, token blocks fastest) and the forward's new split count (``grouped_vocab_splits``).
* ``old fused_linear_loss``: ``fastalign.ops.fused_linear.fused_linear_loss`` (``gradient_in_forward=True``) as it
  was (the nn modules' default on CUDA until 28315bf): chunks of tokens whose logits and gradient fit the budget
  (512 at the issue's shape), each gathering its rows, materialising its logits with ``F.linear``, its gradient
  in a new tensor, and adding ``grad.T @ rows`` (a bf16 ``[V, D]`` temporary) into the float32 ``d_weight``.
* ``fused_linear_loss``: the same path now: the gradient written into the chunk's logits, so a chunk holds twice
  the tokens (1024 at 256 MiB), rows and ``d_hidden`` rows as views, and ``d_weight += grad.T @ rows`` by cuBLAS
  into float32 (``out_dtype``), the first chunk writing it; also at twice the budget, where each chunk's
  ``d_weight`` update is compute-bound (chunk ≥ 4 × peak ÷ bandwidth tokens).
* ``fused-fwd-2d``: the forward over a 2D grid of (token tile × vocabulary tile) programs in a grouped order,
  per-tile statistics merged across vocabulary tiles; the backward on the same grid recomputes each logit tile,
  forms ``d_logits`` in registers and adds ``d_logits @ weight[tile]`` and ``d_logitsᵀ @ hidden[tile]`` with float32
  atomics into float32 ``d_hidden`` / ``d_weight`` (no ``[N, V]``-sized intermediate anywhere).
* ``grad-in-forward 6NDV``: TRL's chunked_logprob tiles (4096 tokens × 32768 columns, cuBLAS matmuls, float32
  gradient accumulation), with the gradient formed in the forward as a scalar loss allows: a token chunk's logits
  (all V columns) are held until its logsumexp is known, turned into their gradient in place, and fed to the two
  gradient matmuls. 6·N·D·V flops; per-token upstream gradients (``linear_logprobs``) cannot use it.
* ``trl-chunked 8NDV``: TRL 1.16's ``ChunkedLogProbFunction`` as it is: the same tiles, statistics in the forward,
  the logits recomputed in the backward.
* references: the bare torch matmuls at the same shapes (logits, then both gradient matmuls over a materialised
  ``[N, V]`` gradient) at 75 % of peak, which is what cuBLAS sustains on large bf16 GEMMs (an assumption, not a
  measurement); and 6·N·D·V at peak with the unavoidable traffic.

The L2 model (``replay``), per kernel launch:

* Programs start in launch order (CUDA's block order: grid axis 0 fastest) and run in *waves* of
  ``SMs × programs resident per SM`` consecutive programs; residency comes from registers × threads and shared
  memory against the SM's limits (``programs_per_sm``), for today's Triton kernels from their sm_90 compile
  results (``COMPILE_STATS``, from ``python -m bench.aot``); cuBLAS and the hypothetical kernels are assumed to run
  one 128 × 256 tile per SM (the usual shape of cuBLAS's and CUTLASS's H100 bf16 kernels), cuBLAS credited with
  the grouped raster (any power-of-two group of either operand's tiles) that moves the least.
* A program is a sequence of *steps*; a step reads, writes or updates whole operand tiles (a ``[rows, D]`` panel of
  ``hidden``, a ``[cols, D]`` panel of ``weight``, an output tile). The programs of one wave advance in lockstep
  along their inner (K) loops, so a tile that several programs of the wave touch in the same step comes from HBM
  at most once: what is live at any instant is one K-slice of each tile, which always fits.
* Across steps and waves the L2 is one shared, byte-capacity LRU of whole tiles (the usable 50 MiB; H100's two
  partitions are not modelled): a re-read hits when the distinct bytes touched since the tile's last use fit
  (LRU's reuse-distance rule), else it is fetched again. Writes allocate without a fetch and reach HBM once, when
  evicted or at the kernel's end (write-back); a float32 read-modify-write (``+=``, atomics) fetches on a miss and
  writes back once. Every kernel starts with a cold L2 (pessimistic by at most the L2's size per launch).
* Atomics are executed by the L2: every atomic operand byte is L2-atomic traffic, counted apart from HBM and
  timed at ``Machine.l2_atomic_bandwidth`` (an assumed sustained fp32 reduction rate, 5.5 TB/s on H100).
* A tile at a tensor's edge counts its real bytes (what the masked loads read).

Time per kernel is its roofline: ``max(FLOP / (peak × efficiency), HBM bytes / HBM bandwidth, L2-atomic bytes /
L2 atomic bandwidth)``, the largest term naming the bound; a design's time is the sum over its kernels. FLOP counts
are the matmuls' (2 per multiply-add); the softmax's exponentials (one per logit per pass, ~0.5 ms per pass at
the issue's shape on the 3.9 TFLOP/s of special functions FlashAttention-3 quotes for H100) and other elementwise
work are not counted, as if overlapped with the tensor cores. Wave quantisation (a last, partial wave) and launch
overheads are ignored.

Examples:
    python -m bench.roofline                                    # the issue's shape, H100 and H200, to stdout
    python -m bench.roofline --out bench/results/roofline-h100.md
    python -m bench.roofline --gpu h200 --tokens 8192 --vocab 151936
"""

from __future__ import annotations

import argparse
import functools
import itertools
import shlex
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.cases import TRL_CHUNK_SIZE
from fastalign.kernels.triton import linear_stats
from fastalign.ops import _triton_backend, dispatch

MIB = 1 << 20
GB = 1e9

# ---------------------------------------------------------------------------------------------------------------
# Machines and the problem


@dataclass(frozen=True)
class Machine:
    """One GPU's limits. Rates in FLOP/s and bytes/s, sizes in bytes."""

    key: str
    name: str
    half_flops: float  # dense bf16 / fp16 tensor-core peak
    tf32_flops: float  # dense TF32 tensor-core peak (float32 inputs)
    hbm_bandwidth: float
    l2_bytes: int  # what the model may fill
    l2_atomic_bandwidth: float  # float32 atomic operand bytes per second the L2 absorbs (an assumption)
    sms: int = 132
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_block: int = 1024  # sm_90 reserves 1 KiB of shared memory per resident block
    max_blocks_per_sm: int = 32
    max_threads_per_sm: int = 2048
    note: str = ""

    def peak_flops(self, dtype: str) -> float:
        return self.tf32_flops if DTYPE_KIND[dtype] == "tf32" else self.half_flops

    def describe(self, dtype: str) -> str:
        return (
            f"{self.name}: {self.peak_flops(dtype) / 1e12:.0f} TFLOP/s dense {dtype} (tensor cores), "
            f"{self.hbm_bandwidth / 1e12:.2f} TB/s HBM, {self.l2_bytes / MIB:.0f} MiB of L2 modelled, "
            f"{self.l2_atomic_bandwidth / 1e12:.1f} TB/s of L2 float32 atomics (assumed), {self.sms} SMs"
            + (f"; {self.note}" if self.note else "")
        )


MACHINES = {
    "h100": Machine("h100", "H100 SXM", 989e12, 494.7e12, 3.35e12, 50 * MIB, 5.5e12),
    "h200": Machine("h200", "H200 SXM", 989e12, 494.7e12, 4.8e12, 50 * MIB, 5.5e12, note="60 MB of L2, ~50 MB usable"),
}

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Which tile lists a dtype draws from (linear_stats.tile_kind): float32 as TF32, as the kernels run it with torch's
# allow_tf32 switch on (with it off they take FMA tiles, which this model does not cover).
DTYPE_KIND = {"bf16": "half", "fp16": "half", "fp32": "tf32"}
# TRL 1.16's trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE (importing TRL pulls in transformers), and the vocabulary
# chunk its trainers pass.
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = TRL_CHUNK_SIZE
# cuBLAS on large bf16 GEMMs: the share of peak the bare-matmul reference is allowed (assumed, not measured).
CUBLAS_EFFICIENCY = 0.75
# The issue's on-paper targets: traffic against the unavoidable bytes, time against 6·N·D·V at peak.
TRAFFIC_TARGET = 3.0
TIME_TARGET = 1.15


@dataclass(frozen=True)
class Problem:
    """``linear_logprobs`` on ``hidden [tokens, width]`` and ``weight [vocab, width]``, both ``dtype``; gradients
    for both; no bias."""

    tokens: int
    width: int
    vocab: int
    dtype: str = "bf16"
    scratch_bytes: int = dispatch._DEFAULT_SCRATCH_BYTES["cuda"]

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def least_flops(self) -> float:
        """6·N·D·V: the logits once and both gradient matmuls."""
        return 6.0 * self.tokens * self.width * self.vocab

    @property
    def unavoidable_bytes(self) -> float:
        """Read ``hidden`` and ``weight`` once, write ``d_hidden`` and ``d_weight`` once, in their dtype."""
        return 2.0 * (self.tokens + self.vocab) * self.width * self.itemsize


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------------------
# The L2 model

READ, WRITE, UPDATE, ATOMIC = "read", "write", "update", "atomic"
# A tile: ``(tensor name, *tile index, bytes)``; every tile of a tensor is accessed the same way (``modes``).
Tile = tuple
Step = Sequence[Tile]
Program = Sequence[Step]


@dataclass(frozen=True)
class Traffic:
    """Bytes one launch (or the sum of several) moves: from and to HBM, and atomic operands into the L2.
    ``tensors``: per tensor ``(name, HBM bytes read, HBM bytes written, distinct bytes touched)``."""

    hbm_read: float = 0.0
    hbm_written: float = 0.0
    l2_atomic: float = 0.0
    tensors: tuple[tuple[str, float, float, float], ...] = ()

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_read + self.hbm_written

    def passes(self, name: str) -> float:
        """How many times ``name`` crossed the HBM interface: bytes moved / its distinct bytes (reads, or writes
        for a write-only tensor)."""
        for tensor, read, written, distinct in self.tensors:
            if tensor == name:
                return (read or written) / distinct
        raise KeyError(name)

    def scaled(self, times: float) -> Traffic:
        return Traffic(
            self.hbm_read * times,
            self.hbm_written * times,
            self.l2_atomic * times,
            tuple((n, r * times, w * times, d * times) for n, r, w, d in self.tensors),
        )

    def __add__(self, other: Traffic) -> Traffic:
        merged: dict[str, list[float]] = {}
        for name, *values in (*self.tensors, *other.tensors):
            merged.setdefault(name, [0.0, 0.0, 0.0])
            merged[name] = [a + b for a, b in zip(merged[name], values, strict=True)]
        return Traffic(
            self.hbm_read + other.hbm_read,
            self.hbm_written + other.hbm_written,
            self.l2_atomic + other.l2_atomic,
            tuple((name, *values) for name, values in merged.items()),
        )


class L2Cache:
    """A write-back LRU of whole tiles with a byte capacity, counting per tensor what crosses to HBM."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lines: OrderedDict[Tile, bool] = OrderedDict()  # tile -> dirty, least recently used first
        self.used = 0
        self.read: defaultdict[str, float] = defaultdict(float)
        self.written: defaultdict[str, float] = defaultdict(float)
        self.distinct: defaultdict[str, float] = defaultdict(float)
        self.seen: set[Tile] = set()

    def touch(self, tile: Tile, mode: str) -> None:
        self.touch_all((tile,), {tile[0]: mode})

    def touch_all(self, tiles: Iterable[Tile], modes: dict[str, str]) -> None:
        """Use each of ``tiles`` in order, as ``modes[tensor]`` says (the replay's hot loop: lookups hoisted)."""
        lines, seen, read, written = self.lines, self.seen, self.read, self.written
        move_to_end, evict = lines.move_to_end, lines.popitem
        used, capacity = self.used, self.capacity
        for tile in tiles:
            mode = modes[tile[0]]
            if tile in lines:
                move_to_end(tile)
                if mode != READ:
                    lines[tile] = True
                continue
            name, nbytes = tile[0], tile[-1]
            if tile not in seen:
                seen.add(tile)
                self.distinct[name] += nbytes
            if mode != WRITE:  # a full overwrite allocates without a fetch; reads and read-modify-writes fetch
                read[name] += nbytes
            lines[tile] = mode != READ
            used += nbytes
            while used > capacity:
                evicted, dirty = evict(last=False)
                used -= evicted[-1]
                if dirty:
                    written[evicted[0]] += evicted[-1]
        self.used = used

    def flush(self) -> None:
        """The kernel ends: dirty tiles go to HBM."""
        for tile, dirty in self.lines.items():
            if dirty:
                self.written[tile[0]] += tile[-1]
        self.lines.clear()
        self.used = 0


def replay(programs: Iterable[Program], modes: dict[str, str], concurrent: int, l2_bytes: int) -> Traffic:
    """The traffic of one launch: ``programs`` in launch order, ``concurrent`` at a time (a wave) advancing step by
    step in lockstep, through an ``l2_bytes`` LRU (see the module docstring). ``modes``: each tensor's access
    (``READ``, ``WRITE``, ``UPDATE`` or ``ATOMIC``)."""
    cache = L2Cache(l2_bytes)
    atomic_tensors = {name for name, mode in modes.items() if mode == ATOMIC}
    l2_atomic = 0.0
    remaining = iter(programs)
    while wave := list(itertools.islice(remaining, concurrent)):
        for step in itertools.zip_longest(*wave, fillvalue=()):
            tiles = list(itertools.chain.from_iterable(step))
            if atomic_tensors:  # every program's atomics reach the L2, shared tiles or not
                l2_atomic += sum(tile[-1] for tile in tiles if tile[0] in atomic_tensors)
            cache.touch_all(dict.fromkeys(tiles), modes)  # a tile shared within the step: fetched at most once
    cache.flush()
    names = list(cache.distinct)
    tensors = tuple((n, cache.read.get(n, 0.0), cache.written.get(n, 0.0), cache.distinct[n]) for n in names)
    return Traffic(sum(cache.read.values()), sum(cache.written.values()), l2_atomic, tensors)


def programs_per_sm(regs_per_thread: int, warps: int, smem_bytes: int, machine: Machine) -> int:
    """Blocks of one kernel resident on an SM: the tightest of registers (allocated 8 per thread at a time),
    shared memory (plus the per-block reservation), threads and the block limit."""
    threads = 32 * warps
    by_regs = machine.regs_per_sm // (cdiv(regs_per_thread, 8) * 8 * threads)
    by_smem = machine.smem_per_sm // (smem_bytes + machine.smem_reserved_per_block)
    by_threads = machine.max_threads_per_sm // threads
    return max(1, min(by_regs, by_smem, by_threads, machine.max_blocks_per_sm))


def grouped_order(rows: int, cols: int, group: int, rows_first: bool = True) -> Iterator[tuple[int, int]]:
    """Tiles ``(row, col)`` of a ``rows × cols`` grid in grouped order: ``group`` rows at a time across every
    column, the rows fastest within a group (Triton's GROUP_M); ``rows_first=False`` groups columns instead.
    ``group >= rows`` is the plain order of a grid whose axis 0 is ``rows``."""
    if rows_first:
        for first in range(0, rows, group):
            for col in range(cols):
                for row in range(first, min(first + group, rows)):
                    yield row, col
    else:
        for col, row in grouped_order(cols, rows, group, True):
            yield row, col


def _group_sizes(extent: int) -> list[int]:
    """Powers of two below ``extent``, and ``extent``: the group sizes a raster search tries."""
    sizes = [1 << p for p in range(extent.bit_length()) if (1 << p) < extent]
    return [*sizes, extent]


# ---------------------------------------------------------------------------------------------------------------
# Kernels and designs


@dataclass(frozen=True)
class KernelCost:
    """One kernel's work over all its launches: FLOP, traffic, and how its roofline time is taken."""

    name: str
    flops: float
    traffic: Traffic
    launches: int = 1
    detail: str = ""  # tile, grid, order, residency
    efficiency: float = 1.0  # the share of peak FLOP/s the compute term allows

    def terms(self, machine: Machine, dtype: str) -> dict[str, float]:
        """Seconds per bound: compute, HBM, L2 atomics."""
        compute = "compute" if self.efficiency == 1.0 else f"compute ({self.efficiency:.0%} of peak)"
        return {
            compute: self.flops / (machine.peak_flops(dtype) * self.efficiency),
            "HBM": self.traffic.hbm_bytes / machine.hbm_bandwidth,
            "L2 atomics": self.traffic.l2_atomic / machine.l2_atomic_bandwidth,
        }

    def seconds(self, machine: Machine, dtype: str) -> float:
        return max(self.terms(machine, dtype).values())

    def bound(self, machine: Machine, dtype: str) -> str:
        terms = self.terms(machine, dtype)
        return max(terms, key=terms.get)

    @property
    def intensity(self) -> float:
        """FLOP per HBM byte."""
        return self.flops / self.traffic.hbm_bytes if self.traffic.hbm_bytes else float("inf")

    def reuse(self) -> str:
        """HBM passes per launch of the operands that carry most of the traffic: ``hidden 512×``."""
        total = self.traffic.hbm_bytes
        shown = [(n, r + w, d) for n, r, w, d in self.traffic.tensors if r + w >= 0.02 * total]
        return ", ".join(f"{n} {_num(self.traffic.passes(n))}×" for n, _, _ in sorted(shown, key=lambda t: -t[1]))


@dataclass(frozen=True)
class Design:
    name: str
    summary: str
    kernels: tuple[KernelCost, ...]
    flops_label: str = ""  # e.g. 8NDV
    notes: tuple[str, ...] = field(default=())

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def traffic(self) -> Traffic:
        return sum((k.traffic for k in self.kernels), Traffic())

    def seconds(self, machine: Machine, dtype: str) -> float:
        return sum(k.seconds(machine, dtype) for k in self.kernels)

    def part(self, prefix: str) -> Design:
        """The kernels whose name starts with ``prefix`` (``fwd`` or ``bwd``)."""
        return replace(self, kernels=tuple(k for k in self.kernels if k.name.startswith(prefix)))


def streaming(name: str, read: float, written: float, launches: int = 1, detail: str = "") -> KernelCost:
    """An elementwise / reduction kernel: every byte crosses HBM once, no matmul FLOP. Bytes over all launches."""
    return KernelCost(name, 0.0, Traffic(read, written), launches, detail)


def _fastest(costs: Iterable[KernelCost], machine: Machine, dtype: str) -> KernelCost:
    """The candidate with the least predicted time (then traffic): what an autotuner or cuBLAS's heuristics are
    credited with."""
    return min(costs, key=lambda k: (k.seconds(machine, dtype), k.traffic.hbm_bytes))


# --- today's Triton kernels

# sm_90 compile results of today's kernels' tiles (``python -m bench.aot``, bench/results/aot-sm80-sm90.md as of
# commit 015da5a): per (kernel, tile kind, (rows, cols, inner, warps, stages)) the shared memory in KiB and the
# registers per thread. Only the residency they imply enters the model.
COMPILE_STATS = {
    ("linear_stats_fwd_kernel", "half", (128, 128, 64, 8, 3)): (96, 245),
    ("linear_stats_fwd_kernel", "half", (128, 128, 64, 8, 4)): (128, 251),
    ("linear_stats_fwd_kernel", "half", (64, 256, 64, 8, 4)): (160, 250),
    ("linear_stats_fwd_kernel", "half", (64, 128, 64, 4, 4)): (96, 255),
    ("linear_stats_fwd_kernel", "tf32", (64, 256, 32, 8, 3)): (120, 191),
    ("linear_stats_fwd_kernel", "tf32", (128, 64, 32, 8, 4)): (96, 182),
    ("linear_stats_fwd_kernel", "tf32", (64, 128, 32, 8, 3)): (72, 158),
    ("linear_stats_fwd_kernel", "tf32", (64, 128, 32, 4, 4)): (96, 255),
    ("linear_grad_logits_kernel", "half", (128, 128, 64, 8, 3)): (96, 254),
    ("linear_grad_logits_kernel", "half", (128, 128, 64, 8, 4)): (128, 254),
    ("linear_grad_logits_kernel", "half", (64, 256, 64, 8, 4)): (160, 254),
    ("linear_grad_logits_kernel", "half", (64, 128, 64, 4, 4)): (96, 242),
    ("linear_grad_logits_kernel", "tf32", (64, 256, 32, 8, 3)): (120, 160),
    ("linear_grad_logits_kernel", "tf32", (128, 64, 32, 8, 4)): (96, 196),
    ("linear_grad_logits_kernel", "tf32", (64, 128, 32, 8, 3)): (72, 128),
    ("linear_grad_logits_kernel", "tf32", (64, 128, 32, 4, 4)): (96, 168),
    ("matmul_accumulate_kernel", "half", (128, 128, 64, 8, 3)): (96, 182),
    ("matmul_accumulate_kernel", "half", (128, 128, 64, 8, 4)): (128, 182),
    ("matmul_accumulate_kernel", "half", (64, 128, 64, 4, 4)): (96, 182),
    ("matmul_accumulate_kernel", "half", (128, 64, 64, 4, 4)): (96, 188),
    ("matmul_accumulate_kernel", "tf32", (128, 128, 32, 8, 3)): (96, 182),
    ("matmul_accumulate_kernel", "tf32", (64, 128, 32, 4, 4)): (96, 178),
    ("matmul_accumulate_kernel", "tf32", (128, 128, 64, 8, 3)): (192, 182),
    ("matmul_accumulate_kernel", "tf32", (64, 128, 64, 4, 4)): (192, 180),
}
_TILE_LISTS = {
    "linear_stats_fwd_kernel": linear_stats._LOGIT_TILES,
    "linear_grad_logits_kernel": linear_stats._LOGIT_TILES,
    "matmul_accumulate_kernel": linear_stats._MATMUL_TILES,
}
# The per-block shared memory limit on sm_90 that the launch pruning holds a tile to (linear_stats._SHARED_LIMIT).
_SM90_BLOCK_SMEM = linear_stats._SHARED_LIMIT[9]


def sm90_tiles(kernel: str, dtype: str) -> list[tuple]:
    """The tiles ``kernel``'s autotuner may pick on sm_90 for ``dtype``: its list, less those over the block's
    shared memory (``linear_stats.configs_for``'s pruning; ``shared_bytes``' bound)."""
    itemsize = DTYPE_BYTES[dtype]
    tiles = _TILE_LISTS[kernel][(DTYPE_KIND[dtype], 9)]
    return [t for t in tiles if t[4] * (t[0] + t[1]) * t[2] * itemsize <= _SM90_BLOCK_SMEM]


def triton_residency(kernel: str, dtype: str, tile: tuple, machine: Machine) -> int:
    smem_kib, regs = COMPILE_STATS[(kernel, DTYPE_KIND[dtype], tile)]
    return programs_per_sm(regs, tile[3], smem_kib * 1024, machine)


def _tile_text(tile: tuple) -> str:
    return f"{tile[0]}×{tile[1]}×{tile[2]} w{tile[3]} s{tile[4]}"


# The forward as issue 14 describes it (commit 015da5a, before cbf993d's grouped order): a grid (token blocks,
# vocabulary splits), token blocks fastest, and ``_triton_backend._vocab_splits``' formula of then. Pinned here
# rather than read from the backend, which now runs in grouped launch order: ``old`` stays the design the issue
# measures its targets from.
OLD_SPLIT_ROWS = 128  # the rows per token block that formula assumes


def vocab_splits(tokens: int, vocab: int, sms: int) -> tuple[int, int]:
    """``(splits, cols_per_split)`` of today's forward grid on a GPU with ``sms`` multiprocessors: enough programs
    (two per SM) to fill it when there are few token blocks, at least 4 aligned tiles per split."""
    align = _triton_backend._SPLIT_ALIGN
    token_blocks = cdiv(tokens, OLD_SPLIT_ROWS)
    splits = max(1, min(cdiv(2 * sms, token_blocks), cdiv(vocab, 4 * align)))
    cols_per_split = cdiv(cdiv(vocab, splits), align) * align
    return cdiv(vocab, cols_per_split), cols_per_split


def _row_tiles(name: str, rows: int, block: int, row_bytes: int) -> list[Tile]:
    """``(name, first row, bytes)`` per block of ``block`` rows of a ``rows``-row tensor, ``row_bytes`` a row."""
    return [(name, start, min(block, rows - start) * row_bytes) for start in range(0, rows, block)]


@functools.cache
def split_forward_traffic(
    p: Problem, tile: tuple, splits: int, cols_per_split: int, group_blocks: int, concurrent: int, l2: int
) -> Traffic:
    """``linear_stats_fwd_kernel``'s traffic: ``(token block, split)`` programs in grouped order, ``group_blocks``
    token blocks by every split, token blocks fastest (today: one group of all token blocks, i.e. the 2D grid's
    order); each program walks its split's column tiles, a ``tl.dot`` over D per tile."""
    block_n, block_v = tile[:2]
    row_bytes = p.width * p.itemsize
    hidden = _row_tiles("hidden", p.tokens, block_n, row_bytes)
    targets = _row_tiles("targets", p.tokens, block_n, 8)
    weight = []  # per split, its column tiles
    for start in range(0, p.vocab, cols_per_split):
        stop = min(p.vocab, start + cols_per_split)
        weight.append([("weight", c, min(block_v, stop - c) * row_bytes) for c in range(start, stop, block_v)])

    def programs() -> Iterator[Program]:
        for m, split in grouped_order(len(hidden), splits, group_blocks):
            steps: list[Step] = [(hidden[m], w) for w in weight[split]]  # the hidden block: re-read per column tile
            steps[0] = (*steps[0], targets[m])
            # max, sum of exponentials, target logit: float32 [splits, N] each
            steps.append((("partial", split, m, 3 * 4 * (hidden[m][-1] // row_bytes)),))
            yield steps

    modes = {"hidden": READ, "weight": READ, "targets": READ, "partial": WRITE}
    return replay(programs(), modes, concurrent, l2)


def old_forward(p: Problem, machine: Machine) -> tuple[KernelCost, list[KernelCost]]:
    """``linear_stats_fwd_kernel``: the tile the autotuner is credited with, and every candidate."""
    splits, cols_per_split = vocab_splits(p.tokens, p.vocab, machine.sms)
    candidates = []
    for tile in sm90_tiles("linear_stats_fwd_kernel", p.dtype):
        resident = triton_residency("linear_stats_fwd_kernel", p.dtype, tile, machine)
        token_blocks = cdiv(p.tokens, tile[0])
        concurrent = machine.sms * resident
        traffic = split_forward_traffic(p, tile, splits, cols_per_split, token_blocks, concurrent, machine.l2_bytes)
        grid = f"{token_blocks}×{splits}"
        detail = f"{_tile_text(tile)}, {resident}/SM; grid {grid}, token blocks fastest"
        flops = 2.0 * p.tokens * p.width * p.vocab
        candidates.append(KernelCost("fwd: linear_stats_fwd_kernel", flops, traffic, 1, detail))
    return _fastest(candidates, machine, p.dtype), candidates


@functools.cache
def _old_grad_traffic(p: Problem, tile: tuple, cols: int, concurrent: int, l2: int, group: int = 0) -> Traffic:
    """The gradient kernel over one slab: ``(token block, column tile)`` programs, token blocks fastest, in groups
    of ``group`` token blocks by every column tile (0: one group of all, today's 2D grid order)."""
    block_n, block_v = tile[:2]
    hidden = _row_tiles("hidden", p.tokens, block_n, p.width * p.itemsize)
    # targets (int64), max logit, log-sum and the coefficient α (float32) per token
    row_stats = _row_tiles("row stats", p.tokens, block_n, 8 + 3 * 4)
    weight = [("weight", c, min(block_v, cols - c) * p.width * p.itemsize) for c in range(0, cols, block_v)]

    def programs() -> Iterator[Program]:
        for m, v in grouped_order(len(hidden), len(weight), group or len(hidden)):
            rows = hidden[m][-1] // (p.width * p.itemsize)
            grad = ("grad slab", m, v, rows * (weight[v][-1] // p.width))
            yield ((hidden[m], weight[v], row_stats[m]), (grad,))

    modes = {"hidden": READ, "weight": READ, "row stats": READ, "grad slab": WRITE}
    return replay(programs(), modes, concurrent, l2)


@functools.cache
def _old_accumulate_traffic(p: Problem, tile: tuple, cols: int, concurrent: int, l2: int, group: int = 0) -> Traffic:
    """``out[N, D] (float32) += a[N, cols] @ b[cols, D]``: a = the gradient slab, b = the weight slab; row tiles
    fastest, in groups of ``group`` row tiles by every column tile (0: one group of all, today's order)."""
    block_m, block_k = tile[:2]
    grad = _row_tiles("grad slab", p.tokens, block_m, cols * p.itemsize)
    weight = [("weight", k, cols * min(block_k, p.width - k) * p.itemsize) for k in range(0, p.width, block_k)]

    def programs() -> Iterator[Program]:
        for m, k in grouped_order(len(grad), len(weight), group or len(grad)):
            rows = grad[m][-1] // (cols * p.itemsize)
            out = ("d_hidden fp32", m, k, rows * (weight[k][-1] // (cols * p.itemsize)) * 4)
            yield ((grad[m], weight[k]), (out,))

    modes = {"grad slab": READ, "weight": READ, "d_hidden fp32": UPDATE}
    return replay(programs(), modes, concurrent, l2)


def slab_widths(p: Problem) -> list[int]:
    """The backward's slab widths, in order (``_triton_backend._slab_cols`` and its loop)."""
    slab = _triton_backend._slab_cols(p.tokens, p.vocab, p.itemsize, p.scratch_bytes)
    return [min(slab, p.vocab - start) for start in range(0, p.vocab, slab)]


def _over_slabs(p: Problem, cost_of_slab: Callable[[int], KernelCost]) -> KernelCost:
    """One launch per slab, summed; slabs of equal width cost the same (every launch starts with a cold L2, so
    where the slab lies does not matter)."""
    widths = slab_widths(p)
    per_width = {width: cost_of_slab(width) for width in dict.fromkeys(widths)}
    first = per_width[widths[0]]
    traffic = sum((per_width[w].traffic for w in widths[1:]), first.traffic)
    flops = sum(per_width[w].flops for w in widths)
    return replace(first, flops=flops, traffic=traffic, launches=len(widths))


def old_backward(p: Problem, machine: Machine, group: int = 0) -> list[KernelCost]:
    """The slab loop of ``_triton_backend.linear_backward``, each Triton kernel at its fastest tile; ``group``: the
    two Triton kernels' grouped launch order (token blocks per group; 0: today's plain order)."""
    order = "token blocks fastest" if not group else f"groups of {group} token blocks × every column tile"
    concurrent_of = {
        kernel: {t: machine.sms * triton_residency(kernel, p.dtype, t, machine) for t in sm90_tiles(kernel, p.dtype)}
        for kernel in ("linear_grad_logits_kernel", "matmul_accumulate_kernel")
    }

    def grad_kernel(cols: int) -> KernelCost:
        costs = []
        for tile, concurrent in concurrent_of["linear_grad_logits_kernel"].items():
            traffic = _old_grad_traffic(p, tile, cols, concurrent, machine.l2_bytes, group)
            grid = f"{cdiv(p.tokens, tile[0])}×{cdiv(cols, tile[1])}"
            detail = f"{_tile_text(tile)}, {concurrent // machine.sms}/SM; grid {grid} per slab, {order}"
            costs.append(
                KernelCost("bwd: linear_grad_logits_kernel", 2.0 * p.tokens * cols * p.width, traffic, 1, detail)
            )
        return _fastest(costs, machine, p.dtype)

    def accumulate_kernel(cols: int) -> KernelCost:
        costs = []
        for tile, concurrent in concurrent_of["matmul_accumulate_kernel"].items():
            traffic = _old_accumulate_traffic(p, tile, cols, concurrent, machine.l2_bytes, group)
            grid = f"{cdiv(p.tokens, tile[0])}×{cdiv(p.width, tile[1])}"
            detail = f"{_tile_text(tile)}, {concurrent // machine.sms}/SM; grid {grid}, {order}"
            name = "bwd: matmul_accumulate_kernel (d_hidden fp32 += grad @ weight)"
            costs.append(KernelCost(name, 2.0 * p.tokens * cols * p.width, traffic, 1, detail))
        return _fastest(costs, machine, p.dtype)

    def weight_matmul(cols: int) -> KernelCost:
        return gemm(
            "bwd: torch.mm d_weight[slab] = grad.T @ hidden",
            Gemm(cols, p.width, p.tokens, ("grad slab", p.itemsize), ("hidden", p.itemsize), ("d_weight", p.itemsize)),
            machine,
        )

    hidden32 = 4.0 * p.tokens * p.width
    return [
        streaming("bwd: zero d_hidden fp32", 0.0, hidden32),
        _over_slabs(p, grad_kernel),
        _over_slabs(p, accumulate_kernel),
        _over_slabs(p, weight_matmul),
        streaming("bwd: d_hidden fp32 -> dtype", hidden32, hidden32 / 4 * p.itemsize),
    ]


def old_design(p: Problem, machine: Machine) -> Design:
    forward, _ = old_forward(p, machine)
    splits, _ = vocab_splits(p.tokens, p.vocab, machine.sms)
    merge = streaming("fwd: merge split statistics (torch)", 3.0 * 4 * splits * p.tokens, 4.0 * 4 * p.tokens)
    slabs = slab_widths(p)
    return Design(
        "old",
        f"before cbf993d: forward grid (token blocks × {splits} splits); backward slabs: {len(slabs)} × "
        f"{slabs[0]} columns ({p.scratch_bytes // MIB} MiB scratch)",
        (forward, merge, *old_backward(p, machine)),
        "8NDV",
    )


# The grouped launch order (the backend since cbf993d): the same kernels, their programs in groups of
# ``GROUP_TOKEN_BLOCKS`` token blocks by every vocabulary split / column tile, and the forward's split count.
def grouped_vocab_splits(tokens: int, vocab: int, sms: int) -> tuple[int, int]:
    """``(splits, cols_per_split)`` of ``_triton_backend._vocab_splits``: a wave (two programs per SM) spans the
    splits of one group of token blocks."""
    align, group = _triton_backend._SPLIT_ALIGN, _triton_backend.GROUP_TOKEN_BLOCKS
    token_blocks = min(cdiv(tokens, OLD_SPLIT_ROWS), group)
    splits = max(1, min(cdiv(2 * sms, token_blocks), cdiv(vocab, 4 * align)))
    cols_per_split = cdiv(cdiv(vocab, splits), align) * align
    return cdiv(vocab, cols_per_split), cols_per_split


def grouped_forward(p: Problem, machine: Machine) -> KernelCost:
    splits, cols_per_split = grouped_vocab_splits(p.tokens, p.vocab, machine.sms)
    group = _triton_backend.GROUP_TOKEN_BLOCKS
    candidates = []
    for tile in sm90_tiles("linear_stats_fwd_kernel", p.dtype):
        resident = triton_residency("linear_stats_fwd_kernel", p.dtype, tile, machine)
        concurrent = machine.sms * resident
        traffic = split_forward_traffic(p, tile, splits, cols_per_split, group, concurrent, machine.l2_bytes)
        detail = (
            f"{_tile_text(tile)}, {resident}/SM; grid {cdiv(p.tokens, tile[0])}×{splits}, groups of {group} token "
            "blocks × every split"
        )
        flops = 2.0 * p.tokens * p.width * p.vocab
        candidates.append(KernelCost("fwd: linear_stats_fwd_kernel", flops, traffic, 1, detail))
    return _fastest(candidates, machine, p.dtype)


def grouped_design(p: Problem, machine: Machine) -> Design:
    splits, _ = grouped_vocab_splits(p.tokens, p.vocab, machine.sms)
    merge = streaming("fwd: merge split statistics (torch)", 3.0 * 4 * splits * p.tokens, 4.0 * 4 * p.tokens)
    group = _triton_backend.GROUP_TOKEN_BLOCKS
    return Design(
        "grouped",
        f"the backend since cbf993d: the same kernels in grouped launch order (groups of {group} token blocks × "
        f"every split or column tile; {splits} forward splits); the backward's slabs and torch.mm unchanged",
        (grouped_forward(p, machine), merge, *old_backward(p, machine, group)),
        "8NDV",
    )


# --- cuBLAS GEMMs


@dataclass(frozen=True)
class Gemm:
    """``c[m, n] (=|+=) a[m, k] @ b[k, n]``; operands as ``(tensor name, bytes per element)``."""

    m: int
    n: int
    k: int
    a: tuple[str, int]
    b: tuple[str, int]
    c: tuple[str, int]
    accumulate: bool = False  # c += (beta = 1): read-modify-write

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


# cuBLAS's and CUTLASS's usual H100 bf16 tile, one per SM.
CUBLAS_TILE = (128, 256)


@functools.cache
def _gemm_traffic(g: Gemm, tile: tuple[int, int], group: int, rows_first: bool, concurrent: int, l2: int):
    tile_m, tile_n = tile
    a_rows = _row_tiles(g.a[0], g.m, tile_m, g.k * g.a[1])  # a panel [tile_m, k]
    b_cols = _row_tiles(g.b[0], g.n, tile_n, g.k * g.b[1])  # b panel [k, tile_n]

    def programs() -> Iterator[Program]:
        for i, j in grouped_order(len(a_rows), len(b_cols), group, rows_first):
            rows, cols = a_rows[i][-1] // (g.k * g.a[1]), b_cols[j][-1] // (g.k * g.b[1])
            yield ((a_rows[i], b_cols[j]), ((g.c[0], i, j, rows * cols * g.c[1]),))

    modes = {g.a[0]: READ, g.b[0]: READ, g.c[0]: UPDATE if g.accumulate else WRITE}
    return replay(programs(), modes, concurrent, l2)


def gemm(name: str, g: Gemm, machine: Machine, launches: int = 1, efficiency: float = 1.0) -> KernelCost:
    """A cuBLAS matmul with 128 × 256 tiles, one per SM, credited with its best grouped raster (either
    operand's panels grouped, any power-of-two group). Figures over ``launches`` identical launches."""
    tiles_m, tiles_n = cdiv(g.m, CUBLAS_TILE[0]), cdiv(g.n, CUBLAS_TILE[1])
    candidates = []
    for rows_first, extent in ((True, tiles_m), (False, tiles_n)):
        for group in _group_sizes(extent):
            traffic = _gemm_traffic(g, CUBLAS_TILE, group, rows_first, machine.sms, machine.l2_bytes)
            order = f"groups of {group} {'row' if rows_first else 'column'} tiles"
            detail = f"cuBLAS {CUBLAS_TILE[0]}×{CUBLAS_TILE[1]} tiles, 1/SM; {g.m}×{g.n}×{g.k}, {order}"
            candidates.append(
                KernelCost(name, g.flops * launches, traffic.scaled(launches), launches, detail, efficiency)
            )
    return min(candidates, key=lambda k: k.traffic.hbm_bytes)


# --- the chunked designs


def pieces(total: int, size: int) -> list[tuple[int, int]]:
    """``[(piece length, how many)]`` covering ``total`` in pieces of ``size``: the full ones, then a shorter last."""
    full, rest = divmod(total, size)
    return [(size, full)] * (full > 0) + [(rest, 1)] * (rest > 0)


def merge_launches(kernels: Iterable[KernelCost]) -> tuple[KernelCost, ...]:
    """Kernels of the same name summed into one row (the pieces of a chunked loop), in first-seen order."""
    merged: dict[str, KernelCost] = {}
    for k in kernels:
        if k.name in merged:
            first = merged[k.name]
            k = replace(
                first,
                flops=first.flops + k.flops,
                traffic=first.traffic + k.traffic,
                launches=first.launches + k.launches,
            )
        merged[k.name] = k
    return tuple(merged.values())


def _chunk_logits_gemm(p: Problem, machine: Machine, rows: int, count: int) -> KernelCost:
    """A ``fused_linear_loss`` chunk's logits, ``F.linear(rows, weight)``, ``count`` times."""
    s = p.itemsize
    return gemm(
        "fwd: F.linear logits = rows @ weight.T",
        Gemm(rows, p.vocab, p.width, ("rows", s), ("weight", s), ("logits", s)),
        machine,
        count,
    )


def _chunk_d_hidden_gemm(p: Problem, machine: Machine, rows: int, count: int, name: str) -> KernelCost:
    """A ``fused_linear_loss`` chunk's ``d_hidden`` rows, ``grad @ weight``, ``count`` times."""
    s = p.itemsize
    return gemm(name, Gemm(rows, p.width, p.vocab, ("grad", s), ("weight", s), ("d_hidden rows", s)), machine, count)


def old_fused_loss_design(p: Problem, machine: Machine) -> Design:
    """``fused_linear_loss``: per chunk, logits by ``F.linear``, their statistics and gradient by the logits
    kernels, ``d_hidden[chunk] = grad @ weight`` and ``add_matmul(d_weight32, grad.T, rows)``."""
    s = p.itemsize
    # fused_linear_loss: a chunk's logits and their gradient, in the input dtype, share the scratch budget.
    chunk = max(1, p.scratch_bytes // (2 * p.vocab * s))
    weight32 = 4.0 * p.vocab * p.width
    per_chunk = []
    for rows, count in pieces(p.tokens, chunk):
        logits, row_bytes = rows * p.vocab * s, rows * p.width * s
        per_chunk += [
            streaming("fwd: hidden[chunk] (index_select)", row_bytes * count, row_bytes * count, count),
            _chunk_logits_gemm(p, machine, rows, count),
            streaming("fwd: logits_stats_fwd_kernel", logits * count, 4 * 4 * rows * count, count),
            streaming("fwd: logits_grad_kernel (new tensor)", logits * count, logits * count, count),
            _chunk_d_hidden_gemm(p, machine, rows, count, "fwd: d_hidden rows = grad @ weight"),
            streaming("fwd: d_hidden[chunk] = d_rows (index_put)", row_bytes * count, row_bytes * count, count),
            gemm(
                "fwd: add_matmul temporary = grad.T @ rows",
                Gemm(p.vocab, p.width, rows, ("grad", s), ("rows", s), ("temporary", s)),
                machine,
                count,
            ),
            # ``out += a @ b`` with a float32 ``out``: the bf16 product, then an elementwise add into ``out``
            streaming(
                "fwd: add_matmul d_weight fp32 += temporary",
                (p.vocab * p.width * s + weight32) * count,
                weight32 * count,
                count,
            ),
        ]
    kernels = (
        streaming(f"fwd: zero d_hidden ({p.dtype}), d_weight (fp32)", 0.0, p.tokens * p.width * s + weight32),
        *merge_launches(per_chunk),
        streaming("bwd: d_hidden × upstream scalar", p.tokens * p.width * s, p.tokens * p.width * s),
        streaming("bwd: d_weight fp32 × upstream scalar, -> dtype", 2 * weight32, weight32 + p.vocab * p.width * s),
    )
    return Design(
        "old fused_linear_loss",
        f"gradient_in_forward=True until issue 14: {cdiv(p.tokens, chunk)} chunks of ≤ {min(chunk, p.tokens)} "
        "tokens, "
        f"logits materialised per chunk, a {p.vocab * p.width * s / 2**30:.3g} GiB temporary per chunk added into "
        "the float32 d_weight",
        kernels,
        "6NDV",
    )


def fused_loss_design(p: Problem, machine: Machine, scratch_bytes: int | None = None) -> Design:
    """``fused_linear_loss`` now: a chunk's logits fill the budget (its gradient is written into them), rows and
    ``d_hidden`` rows are views (no gather or scatter), ``d_weight`` (float32) takes each chunk's ``gradᵀ @ rows``
    straight from cuBLAS (``out_dtype``; the first chunk writes it, the rest read-modify-write it)."""
    s = p.itemsize
    budget = p.scratch_bytes if scratch_bytes is None else scratch_bytes
    chunk = max(1, budget // (p.vocab * s))
    weight32 = 4.0 * p.vocab * p.width
    per_chunk, first = [], True
    for rows, count in pieces(p.tokens, chunk):
        logits = rows * p.vocab * s
        # the first chunk writes d_weight (beta = 0); every later one adds into it
        updates = [(False, 1), (True, count - 1)] if first else [(True, count)]
        first = False
        per_chunk += [
            _chunk_logits_gemm(p, machine, rows, count),
            streaming("fwd: logits_stats_fwd_kernel", logits * count, 4 * 4 * rows * count, count),
            streaming("fwd: logits gradient kernel, in place", logits * count, logits * count, count),
            _chunk_d_hidden_gemm(p, machine, rows, count, "fwd: d_hidden[chunk] = grad @ weight (out=)"),
            *(
                gemm(
                    "fwd: d_weight fp32 (+)= grad.T @ rows (cuBLAS, out_dtype)",
                    Gemm(p.vocab, p.width, rows, ("grad", s), ("rows", s), ("d_weight fp32", 4), accumulate=add),
                    machine,
                    n,
                )
                for add, n in updates
                if n
            ),
        ]
    kernels = (
        streaming(f"fwd: zero d_hidden ({p.dtype})", 0.0, p.tokens * p.width * s),
        *merge_launches(per_chunk),
        streaming("bwd: d_hidden × upstream scalar", p.tokens * p.width * s, p.tokens * p.width * s),
        streaming("bwd: d_weight fp32 × upstream scalar, -> dtype", weight32, p.vocab * p.width * s),
    )
    label = "" if scratch_bytes is None else f" {budget / MIB:.0f} MiB"
    return Design(
        "fused_linear_loss" + label,
        f"`gradient_in_forward=True` now, a {budget / MIB:.0f} MiB budget: {cdiv(p.tokens, chunk)} chunks of "
        f"≤ {min(chunk, p.tokens)} tokens, one [chunk, V] buffer each (logits, then their gradient in place), "
        "d_weight accumulated in float32 by cuBLAS",
        kernels,
        "6NDV",
        ("needs a scalar loss (linear_cross_entropy, the loss modules)",),
    )


def _chunk_kernels(p: Problem, machine: Machine, recompute: bool) -> tuple[KernelCost, ...]:
    """The [4096 tokens × 32768 columns] tiles of TRL's chunked_logprob; ``recompute``: TRL's own backward
    (statistics forward, logits recomputed backward); else the gradient formed in the forward."""
    s = p.itemsize
    hidden32, weight32 = 4.0 * p.tokens * p.width, 4.0 * p.vocab * p.width
    forward, gradient = [], []
    for rows, row_count in pieces(p.tokens, TRL_TOKEN_CHUNK):
        for cols, col_count in pieces(p.vocab, TRL_VOCAB_CHUNK):
            tiles, tile_bytes = row_count * col_count, rows * cols * s
            logits = Gemm(rows, cols, p.width, ("hidden chunk", s), ("weight chunk", s), ("logits tile", s))
            grad_hidden = Gemm(
                rows, p.width, cols, ("gradient tile", s), ("weight chunk", s), ("d_hidden fp32", 4), accumulate=True
            )
            grad_weight = Gemm(
                cols, p.width, rows, ("gradient tile", s), ("hidden chunk", s), ("d_weight fp32", 4), accumulate=True
            )
            stats = 5 * 4 * rows * tiles  # TRL's running statistics, read and written per tile
            forward += [
                gemm("fwd: logits tile = hidden chunk @ weight chunk.T", logits, machine, tiles),
                streaming("fwd: fold tile into row statistics (Triton)", tile_bytes * tiles + stats, stats, tiles),
            ]
            gradient += [
                streaming("gradient of the tile, in place (Triton)", tile_bytes * tiles, tile_bytes * tiles, tiles),
                gemm("d_hidden chunk fp32 += gradient @ weight chunk", grad_hidden, machine, tiles),
                gemm("d_weight chunk fp32 += gradient.T @ hidden chunk", grad_weight, machine, tiles),
            ]
    forward, gradient = merge_launches(forward), merge_launches(gradient)
    zero = streaming("zero d_hidden, d_weight fp32", 0.0, hidden32 + weight32)
    casts = streaming("d_hidden, d_weight fp32 -> dtype", hidden32 + weight32, (p.tokens + p.vocab) * p.width * s)
    if recompute:
        recomputed = replace(forward[0], name="bwd: logits tile recomputed")
        return (*forward, _named("bwd: ", zero), recomputed, *(_named("bwd: ", k) for k in (*gradient, casts)))
    # The gradient in the forward: each token chunk's logits, all columns, stay in HBM until its logsumexp is known;
    # the upstream scalar is folded into the final casts.
    return (*(_named("fwd: ", k) for k in (zero, *forward, *gradient)), _named("bwd: ", casts))


def _named(prefix: str, kernel: KernelCost) -> KernelCost:
    return kernel if kernel.name.startswith(("fwd: ", "bwd: ")) else replace(kernel, name=prefix + kernel.name)


def grad_in_forward_design(p: Problem, machine: Machine) -> Design:
    held = min(TRL_TOKEN_CHUNK, p.tokens) * p.vocab * p.itemsize
    return Design(
        "grad-in-forward 6NDV",
        f"TRL's {TRL_TOKEN_CHUNK} × {TRL_VOCAB_CHUNK} cuBLAS tiles, float32 gradient accumulation, the "
        f"gradient formed in the forward (a token chunk's logits held: {held / 2**30:.3g} GiB)",
        _chunk_kernels(p, machine, recompute=False),
        "6NDV",
        (
            "needs a scalar loss (linear_cross_entropy, the loss modules); linear_logprobs' per-token upstream "
            "gradient is not known in the forward",
        ),
    )


def trl_chunked_design(p: Problem, machine: Machine) -> Design:
    return Design(
        "trl-chunked 8NDV",
        f"TRL 1.16's ChunkedLogProbFunction: {TRL_TOKEN_CHUNK} × {TRL_VOCAB_CHUNK} "
        "cuBLAS tiles, statistics forward, logits recomputed backward",
        _chunk_kernels(p, machine, recompute=True),
        "8NDV",
    )


# --- the fused 2D design

# The hypothetical fused kernels' tile: cuBLAS's, one program per SM.
FUSED_TILE = (128, 256)


def _kept(m: int, v: int, share: float) -> bool:
    """Whether tile ``(m, v)`` passes the filter when ``share`` of the tiles do: a fixed hash of the pair, so kept
    tiles are spread evenly over the grid (real ones cluster on frequent tokens, which only helps the L2)."""
    return share >= 1.0 or ((m * 2654435761 + v * 40503) % 4096) < share * 4096


@functools.cache
def _fused_traffic(
    p: Problem,
    backward: bool,
    group: int,
    tokens_first: bool,
    concurrent: int,
    l2: int,
    tile=FUSED_TILE,
    kept: float = 1.0,
) -> Traffic:
    block_n, block_v = tile
    row_bytes = p.width * p.itemsize
    hidden = _row_tiles("hidden", p.tokens, block_n, row_bytes)
    weight = _row_tiles("weight", p.vocab, block_v, row_bytes)
    rows = [t[-1] // row_bytes for t in hidden]
    if backward:
        row_stats = _row_tiles("row stats", p.tokens, block_n, 8 + 3 * 4)
        d_hidden = _row_tiles("d_hidden fp32", p.tokens, block_n, 4 * p.width)
        d_weight = _row_tiles("d_weight fp32", p.vocab, block_v, 4 * p.width)
        modes = {"hidden": READ, "weight": READ, "row stats": READ, "d_hidden fp32": ATOMIC, "d_weight fp32": ATOMIC}
    else:
        targets = _row_tiles("targets", p.tokens, block_n, 8)
        modes = {"hidden": READ, "weight": READ, "targets": READ, "tile stats": WRITE}

    def programs() -> Iterator[Program]:
        for m, v in grouped_order(len(hidden), len(weight), group, tokens_first):
            if backward:
                # logits over all of D, then a second sweep over D: both gradient dots, added with atomics
                # (a tile the filter skips ends after the first)
                first = (hidden[m], weight[v], row_stats[m])
                yield (first, (hidden[m], weight[v], d_hidden[m], d_weight[v])) if _kept(m, v, kept) else (first,)
            else:
                # max, sum of exponentials, target logit per row and column tile, float32
                yield ((hidden[m], weight[v], targets[m]), (("tile stats", m, v, 3 * 4 * rows[m]),))

    return replay(programs(), modes, concurrent, l2)


def _fused_kernel(p: Problem, machine: Machine, backward: bool) -> KernelCost:
    token_tiles, vocab_tiles = cdiv(p.tokens, FUSED_TILE[0]), cdiv(p.vocab, FUSED_TILE[1])
    candidates = []
    for tokens_first, extent in ((True, token_tiles), (False, vocab_tiles)):
        for group in _group_sizes(extent):
            traffic = _fused_traffic(p, backward, group, tokens_first, machine.sms, machine.l2_bytes)
            order = f"groups of {group} {'token' if tokens_first else 'vocabulary'} tiles × every other"
            detail = f"{FUSED_TILE[0]}×{FUSED_TILE[1]} tiles, 1/SM; grid {token_tiles}×{vocab_tiles}, {order}"
            if backward:
                name, flops = "bwd: fused gradient (recompute, d_logits in registers, fp32 atomics)", 6.0
            else:
                name, flops = "fwd: fused statistics per (token, vocabulary) tile", 2.0
            candidates.append(KernelCost(name, flops * p.tokens * p.width * p.vocab, traffic, 1, detail))
    return _fastest(candidates, machine, p.dtype)


def fused_2d_design(p: Problem, machine: Machine) -> Design:
    block_n, block_v = FUSED_TILE
    vocab_tiles = cdiv(p.vocab, block_v)
    hidden32, weight32 = 4.0 * p.tokens * p.width, 4.0 * p.vocab * p.width
    # Every (token, vocabulary) tile adds [block_n + block_v, D] float32 partials: N·V·D·4·(1/block_n + 1/block_v)
    # atomic bytes against 6·N·D·V flops, so the atomics hide under the compute only when
    # 1/block_n + 1/block_v <= 1.5 · (L2 atomic rate) / peak; square tiles need this many rows:
    square = 2 * machine.peak_flops(p.dtype) / (1.5 * machine.l2_atomic_bandwidth)
    return Design(
        "fused-fwd-2d",
        f"2D grid of {block_n} × {block_v} (token × vocabulary) tiles in the best grouped order, forward statistics "
        "per tile merged after; backward recomputes each tile and adds both gradient dots into float32 with atomics",
        (
            _fused_kernel(p, machine, backward=False),
            streaming("fwd: merge tile statistics", 3.0 * 4 * p.tokens * vocab_tiles, 4.0 * 4 * p.tokens),
            streaming("bwd: zero d_hidden, d_weight fp32", 0.0, hidden32 + weight32),
            _fused_kernel(p, machine, backward=True),
            streaming(
                "bwd: d_hidden, d_weight fp32 -> dtype",
                hidden32 + weight32,
                (p.tokens + p.vocab) * p.width * p.itemsize,
            ),
        ),
        "8NDV",
        (
            f"the backward's atomics hide under its compute only with 1/BLOCK_N + 1/BLOCK_V <= "
            f"{1.5 * machine.l2_atomic_bandwidth / machine.peak_flops(p.dtype):.3g} (square tiles of >= "
            f"{square:.0f} rows; {block_n} × {block_v}: {1 / block_n + 1 / block_v:.3g})",
        ),
    )


# --- the tile backward as built (linear_grad_tiles_kernel, fastalign.set_linear_backward("tiles"))

# Its first sm_90 bf16 tile (linear_stats._TILE_BACKWARD_TILES) and launch order: groups of GROUP_TOKEN_BLOCKS
# token tiles × every vocabulary tile, token tiles fastest.
TILE_BACKWARD_TILE = linear_stats._TILE_BACKWARD_TILES[("half", 9)][0][:2]
# Shares of (token × vocabulary) tiles whose gradient passes the filter: 1 is the exact mode on dense gradients;
# the others are scenarios, not measurements (the GPU run counts the kept tiles of real hidden states).
KEPT_SHARES = (1.0, 0.25, 0.05)


def tile_backward_kernel(p: Problem, machine: Machine, kept: float) -> KernelCost:
    """The tile backward at the share ``kept`` of tiles that pass its filter: every tile recomputes its logits
    (2NDV), the kept ones (:func:`_kept`) add both gradient dots (4NDV × kept) with float32 atomics."""
    group = _triton_backend.GROUP_TOKEN_BLOCKS
    tile = TILE_BACKWARD_TILE
    traffic = _fused_traffic(p, True, group, True, machine.sms, machine.l2_bytes, tile, kept)
    grid = f"{cdiv(p.tokens, tile[0])}×{cdiv(p.vocab, tile[1])}"
    detail = f"{tile[0]}×{tile[1]} tiles, 1/SM (assumed); grid {grid}, groups of {group} token tiles × every other"
    name = f"bwd: linear_grad_tiles_kernel ({kept:.0%} of tiles kept)"
    return KernelCost(name, (2.0 + 4.0 * kept) * p.tokens * p.width * p.vocab, traffic, 1, detail)


def tile_backward_design(p: Problem, machine: Machine, kept: float) -> Design:
    splits, _ = grouped_vocab_splits(p.tokens, p.vocab, machine.sms)
    hidden32, weight32 = 4.0 * p.tokens * p.width, 4.0 * p.vocab * p.width
    square = 2 * machine.peak_flops(p.dtype) / (1.5 * machine.l2_atomic_bandwidth)
    exact = "exact (grad_filter=0, dense gradients)" if kept == 1.0 else f"a filter keeping {kept:.0%} of tiles"
    return Design(
        "tiles" if kept == 1.0 else f"tiles, {kept:.0%} kept",
        f'set_linear_backward("tiles"), {exact}: the grouped forward, then one launch over every '
        f"{TILE_BACKWARD_TILE[0]} × {TILE_BACKWARD_TILE[1]} tile adding both gradient dots into float32 with atomics",
        (
            grouped_forward(p, machine),
            streaming("fwd: merge split statistics (torch)", 3.0 * 4 * splits * p.tokens, 4.0 * 4 * p.tokens),
            streaming("bwd: zero d_hidden, d_weight fp32", 0.0, hidden32 + weight32),
            tile_backward_kernel(p, machine, kept),
            streaming(
                "bwd: d_hidden, d_weight fp32 -> dtype",
                hidden32 + weight32,
                (p.tokens + p.vocab) * p.width * p.itemsize,
            ),
        ),
        f"{2 + 2 + 4 * kept:.3g}NDV",
        (
            f"atomics at {TILE_BACKWARD_TILE[0]} × {TILE_BACKWARD_TILE[1]}: 1/BLOCK_N + 1/BLOCK_V = "
            f"{1 / TILE_BACKWARD_TILE[0] + 1 / TILE_BACKWARD_TILE[1]:.3g} against the "
            f"{1.5 * machine.l2_atomic_bandwidth / machine.peak_flops(p.dtype):.3g} "
            f"that hides them under the compute (square tiles of >= {square:.0f} rows); the kept share is data's",
        ),
    )


# --- references


def bare_gemm_reference(p: Problem, machine: Machine) -> Design:
    s = p.itemsize
    n, d, v = p.tokens, p.width, p.vocab
    return Design(
        f"torch matmuls at {CUBLAS_EFFICIENCY:.0%}",
        "reference: the three bare matmuls (logits, d_hidden, d_weight) over materialised [N, V] tensors, at "
        f"{CUBLAS_EFFICIENCY:.0%} of peak as cuBLAS sustains (assumed); the softmax between them not counted",
        (
            gemm(
                "fwd: logits = hidden @ weight.T",
                Gemm(n, v, d, ("hidden", s), ("weight", s), ("logits", s)),
                machine,
                efficiency=CUBLAS_EFFICIENCY,
            ),
            gemm(
                "bwd: d_hidden = d_logits @ weight",
                Gemm(n, d, v, ("d_logits", s), ("weight", s), ("d_hidden", s)),
                machine,
                efficiency=CUBLAS_EFFICIENCY,
            ),
            gemm(
                "bwd: d_weight = d_logits.T @ hidden",
                Gemm(v, d, n, ("d_logits", s), ("hidden", s), ("d_weight", s)),
                machine,
                efficiency=CUBLAS_EFFICIENCY,
            ),
        ),
        "6NDV",
    )


def least_work_reference(p: Problem) -> Design:
    read = (p.tokens + p.vocab) * p.width * p.itemsize
    kernel = KernelCost("6NDV at peak, unavoidable bytes", p.least_flops, Traffic(read, read))
    return Design("6NDV bound", "reference: 6·N·D·V at peak, the unavoidable traffic", (kernel,), "6NDV")


def all_designs(p: Problem, machine: Machine) -> list[Design]:
    return [
        old_design(p, machine),
        grouped_design(p, machine),
        old_fused_loss_design(p, machine),
        fused_loss_design(p, machine),
        fused_loss_design(p, machine, 2 * p.scratch_bytes),
        fused_2d_design(p, machine),
        *(tile_backward_design(p, machine, kept) for kept in KEPT_SHARES),
        grad_in_forward_design(p, machine),
        trl_chunked_design(p, machine),
        bare_gemm_reference(p, machine),
        least_work_reference(p),
    ]


# ---------------------------------------------------------------------------------------------------------------
# The issue's figures for today's design (issue 14), at its shape on H100, and the model's counterpart of each.

ISSUE_SHAPE = Problem(16384, 4096, 131072, "bf16")
ISSUE_FIGURES = {
    # what the issue says -> (its figure, the model's figure: (design, part, quantity))
    "old forward HBM GB": (69.0, ("old", "fwd", "GB")),
    "old forward ms": (21.0, ("old", "fwd", "ms")),
    "old backward HBM GB": (231.0, ("old", "bwd", "GB")),
    "old backward ms (per-kernel rooflines summed)": (84.0, ("old", "bwd", "ms")),
    "fused_linear_loss HBM GB": (300.0, ("old fused_linear_loss", "", "GB")),
    "fused_linear_loss HBM time ms": (90.0, ("old fused_linear_loss", "", "memory ms")),
}


def model_figure(designs: Sequence[Design], machine: Machine, dtype: str, what: tuple[str, str, str]) -> float:
    """``what = (design name, kernel-name prefix or "", "GB" | "ms" | "memory ms")`` of ``designs``."""
    name, prefix, quantity = what
    design = next(d for d in designs if d.name == name).part(prefix)
    if quantity == "GB":
        return design.traffic.hbm_bytes / GB
    if quantity == "ms":
        return design.seconds(machine, dtype) * 1e3
    return design.traffic.hbm_bytes / machine.hbm_bandwidth * 1e3


# ---------------------------------------------------------------------------------------------------------------
# The report


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def kernel_rows(design: Design, machine: Machine, dtype: str) -> list[str]:
    lines = []
    for k in design.kernels:
        atomic = _num(k.traffic.l2_atomic / GB) if k.traffic.l2_atomic else ""
        intensity = "" if not k.flops else _num(k.intensity)
        lines.append(
            f"| {design.name} | {k.name} | {k.launches} | {_num(k.flops / 1e12)} | {_num(k.traffic.hbm_bytes / GB)} | "
            f"{atomic} | {intensity} | {_num(k.seconds(machine, dtype) * 1e3)} | {k.bound(machine, dtype)} | "
            f"{k.reuse()} | {k.detail} |"
        )
    traffic = design.traffic
    atomic = _num(traffic.l2_atomic / GB) if traffic.l2_atomic else ""
    lines.append(
        f"| **{design.name}** | **total** ({design.flops_label}) | | **{_num(design.flops / 1e12)}** | "
        f"**{_num(traffic.hbm_bytes / GB)}** | {atomic} | {_num(design.flops / traffic.hbm_bytes)} | "
        f"**{_num(design.seconds(machine, dtype) * 1e3)}** | | | |"
    )
    return lines


def target_rows(designs: Sequence[Design], p: Problem, machine: Machine) -> list[str]:
    bound = p.least_flops / machine.peak_flops(p.dtype)
    lines = [
        f"| design | HBM GB | × unavoidable (≤ {TRAFFIC_TARGET:g}) | ms | × 6NDV bound (≤ {TIME_TARGET:g}) | "
        "meets both | what it is |",
        "|---|---|---|---|---|---|---|",
    ]
    for design in designs:
        traffic = design.traffic.hbm_bytes / p.unavoidable_bytes
        time = design.seconds(machine, p.dtype) / bound
        met = traffic <= TRAFFIC_TARGET and time <= TIME_TARGET
        notes = "; ".join((design.summary, *design.notes))
        lines.append(
            f"| {design.name} | {_num(design.traffic.hbm_bytes / GB)} | {traffic:.3g}× | "
            f"{_num(design.seconds(machine, p.dtype) * 1e3)} | {time:.3g}× | {'yes' if met else 'no'} | {notes} |"
        )
    return lines


def machine_section(p: Problem, machine: Machine) -> list[str]:
    designs = all_designs(p, machine)
    bound_ms = p.least_flops / machine.peak_flops(p.dtype) * 1e3
    lines = [
        f"## {machine.name}",
        "",
        f"{machine.describe(p.dtype)}. Least work 6·N·D·V = {p.least_flops:.3g} FLOP = {bound_ms:.3g} ms at peak; "
        f"unavoidable HBM traffic {p.unavoidable_bytes / GB:.3g} GB (hidden and weight read once, d_hidden and "
        f"d_weight written once, {p.dtype}). Targets: traffic ≤ {TRAFFIC_TARGET:g}× unavoidable, time ≤ "
        f"{TIME_TARGET:g}× the 6NDV bound.",
        "",
        *target_rows(designs, p, machine),
        "",
        "### Kernels",
        "",
        "TFLOP and GB over all launches; FLOP/B: FLOP per HBM byte; ms: the kernel's roofline, max(compute, HBM, "
        "L2 atomics); HBM passes: bytes an operand moved per launch / its size (1× = read or written once).",
        "",
        "| design | kernel | launches | TFLOP | HBM GB | L2 atomic GB | FLOP/B | ms | bound | HBM passes per "
        "launch | tile, grid, order |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for design in designs:
        lines += kernel_rows(design, machine, p.dtype)
    _, candidates = old_forward(p, machine)
    lines += [
        "",
        "### Today's forward: the autotuner's candidates",
        "",
        "The model credits the autotuner with the fastest; a hidden block is re-read from HBM for every column tile "
        "whenever one wave's hidden blocks overflow the L2.",
        "",
        "| tile, residency, grid | HBM GB | ms | bound | HBM passes |",
        "|---|---|---|---|---|",
    ]
    for k in candidates:
        lines.append(
            f"| {k.detail} | {_num(k.traffic.hbm_bytes / GB)} | {_num(k.seconds(machine, p.dtype) * 1e3)} | "
            f"{k.bound(machine, p.dtype)} | {k.reuse()} |"
        )
    if p == ISSUE_SHAPE and machine.key == "h100":
        lines += [
            "",
            "### Today's design against the issue's figures",
            "",
            "| figure | issue | model | model / issue |",
            "|---|---|---|---|",
        ]
        for text, (figure, what) in ISSUE_FIGURES.items():
            value = model_figure(designs, machine, p.dtype, what)
            lines.append(f"| {text} | {figure:g} | {_num(value)} | {value / figure:.2f} |")
    return [*lines, ""]


def report(p: Problem, machines: Sequence[Machine], command: str) -> str:
    lines = [
        "# Roofline model of the matmul-fused log-prob kernels (issue 14)",
        "",
        f"`{command}` — a model, nothing measured (bench/roofline.py's docstring states its assumptions). "
        f"linear_logprobs forward+backward (linear_cross_entropy moves the same bytes), N={p.tokens} tokens, "
        f"D={p.width}, V={p.vocab}, {p.dtype}, gradients for hidden and weight, no bias.",
        "",
        "What the model assumes (the module docstring has the details):",
        "",
        "- each launch runs its programs in launch order (grid axis 0 fastest), in waves of SMs × programs resident "
        "per SM (from registers, threads and shared memory; cuBLAS and the hypothetical kernels: one 128 × 256 "
        "tile per SM), a wave's programs in lockstep along their K loops: a tile several of them read in the same "
        "step comes from HBM once;",
        "- the L2 is one LRU of whole tiles, 50 MiB usable on both GPUs: a re-read hits when the distinct bytes "
        "touched since fit, else goes to HBM; writes reach HBM once (write-back), float32 `+=` and atomics fetch "
        "on a miss; each kernel starts with a cold L2;",
        "- atomics run in the L2, their operand bytes timed at the L2 atomic rate (assumed); the autotuner is "
        "credited with the tile, cuBLAS with the grouped raster, the fused designs with the grouped order that "
        "the model predicts fastest;",
        f"- time per kernel = max(FLOP / peak, HBM bytes / bandwidth, atomic bytes / L2 atomic rate), summed over "
        f"kernels; FLOP are the matmuls' (exponentials and other elementwise work assumed overlapped); the bare "
        f"torch matmuls at {CUBLAS_EFFICIENCY:.0%} of peak; no wave quantisation or launch overhead.",
        "",
    ]
    for machine in machines:
        lines += machine_section(p, machine)
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.roofline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="machines:\n"
        + "\n".join(f"  {k:5s} {m.describe('bf16')}" for k, m in MACHINES.items())
        + "\n\n"
        + __doc__[__doc__.index("Examples:") :],
    )
    shape = ISSUE_SHAPE
    parser.add_argument("--tokens", type=int, default=shape.tokens, help="N, tokens (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=shape.width, help="D, hidden width (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=shape.vocab, help="V, vocabulary (default: %(default)s)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        default=shape.dtype,
        help="hidden and weight dtype; fp32 as TF32 on tensor cores (default: %(default)s)",
    )
    parser.add_argument(
        "--gpu",
        nargs="+",
        choices=sorted(MACHINES),
        default=list(MACHINES),
        help="machines, one section each (default: h100 h200)",
    )
    parser.add_argument(
        "--scratch-mib",
        type=int,
        default=shape.scratch_bytes // MIB,
        help="today's scratch budget (backward slabs, fused_linear_loss chunks; default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    if min(args.tokens, args.hidden, args.vocab, args.scratch_mib) < 1:
        parser.error("--tokens, --hidden, --vocab and --scratch-mib must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    problem = Problem(args.tokens, args.hidden, args.vocab, args.dtype, args.scratch_mib * MIB)
    text = report(
        problem, [MACHINES[key] for key in args.gpu], ("python -m bench.roofline " + shlex.join(argv)).strip()
    )
    if args.out is None:
        print(text)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
