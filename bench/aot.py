"""``python -m bench.aot``: compile every GPU kernel for sm_80 and sm_90 here, without a GPU, and gate on the result.

Triton compiles for a GPU target on any machine: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))`` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin). What it is given must be what the
launchers really pass, so nothing here is written by hand: the public ops run on ``meta`` tensors (shapes and
dtypes, no data) at the sizes users run, every Triton launch they make is recorded instead of run, and each
recorded launch is compiled with every autotune config the kernel's own pruning keeps for that dtype and target,
through triton's own argument binder (so integer and pointer specialisation is triton's). ptxas's ``-v`` log gives
registers and spills; the metadata gives shared memory; the PTX shows whether the dots became tensor-core
instructions (``wgmma`` on sm_90, ``mma`` on sm_80). The CUDA C++ kernels of ``csrc/cuda`` are compiled with
``nvcc -Xptxas -v`` for the same targets.

The gate fails (exit 1) on: a compile error; a config the launcher can pick that needs more shared memory than a
block may have (A100 163 KiB, H100 227 KiB); spills in a bfloat16 / float16 config the launcher can pick; spills in
a CUDA C++ kernel; a CUDA C++ kernel off its machine-code target (:func:`sass_target_failures`, counted from
``cuobjdump --dump-sass`` by :func:`hot_paths`).

    python -m bench.aot                      # everything: bench/results/aot-sm80-sm90.md
    python -m bench.aot --fast               # one config per kernel and target (the CI subset), no file
    python -m bench.aot --fast --check-table bench/results/aot-sm80-sm90.md   # what CI runs
    python -m bench.aot --jobs 2 --output PATH

Run it with ``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` builds interpreter functions and the
kernels expose their one interpreter config).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import heapq
import io
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

from bench.report import package_version

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "aot-sm80-sm90.md"

# Compute capability -> (name, the most shared memory one block may use, SMs of the reference part).
TARGETS = {80: ("sm_80 (A100)", 163 * 1024, 108), 90: ("sm_90 (H100/H200)", 227 * 1024, 132)}
# The Triton kernels whose dots should run on tensor cores (all but the IEEE float32 path).
MATMUL_KERNELS = {
    "linear_stats_fwd_kernel",
    "linear_grad_logits_kernel",
    "matmul_accumulate_kernel",
    "linear_grad_tiles_kernel",
    "distill_stats_kernel",
    "distill_mixture_kernel",
    "distill_grad_kernel",
}
# Sizes users run: Qwen2.5-0.5B (D 896, V 151936), Llama-3-8B (D 4096, V 128256), Llama-2 (V 32000); 16384 tokens;
# RL batches whose T is not a multiple of 16.
LINEAR_SHAPES = [(16384, 4096, 128256), (16384, 896, 151936), (16384, 4096, 32000)]
LOGITS_SHAPES = [(16384, 151936), (16384, 32000)]
POLICY_SHAPES = [(64, 1021), (256, 4099)]
# The policy kernels' objective variants (each compiles to its own kernel): the clipped surrogate at token and
# sequence level, the token-level cispo / sapo / weighted log-prob (vespo) objectives, and the bias-corrected KL.
POLICY_VARIANTS = {
    "token": {"importance_sampling_level": "token"},
    "sequence": {"importance_sampling_level": "sequence"},
    "cispo": {"loss_type": "cispo", "clip_eps_high": 5.0},
    "sapo": {"loss_type": "sapo"},
    "vespo": {"loss_type": "vespo"},
    "token bias-corrected-kl": {"use_bias_correction_kl": True},
    "sequence bias-corrected-kl": {"importance_sampling_level": "sequence", "use_bias_correction_kl": True},
}
DPO_SHAPES = [(32, 1021), (8, 4099)]
# Distillation N, student D, teacher D, V: Qwen2.5-0.5B from Qwen2.5-7B (D 3584), Llama-3.2-1B from Llama-3-8B.
DISTILL_SHAPES = [(16384, 896, 3584, 151936), (16384, 2048, 4096, 128256)]
# beta 0, 1 and between: the forward KL, the reverse KL and the mixture (each a MODE of the distill kernels).
DISTILL_BETAS = (0.0, 1.0, 0.5)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: what the launcher passed, and the case it came from."""

    kernel: str
    args: tuple
    kwargs: dict
    dtype: str
    case: str
    pickable: tuple  # the configs the kernel's own pruning keeps for this launch on the recorded target


@dataclasses.dataclass
class Row:
    kernel: str
    target: int
    config: str
    dtype: str
    case: str
    status: str = "ok"
    error: str = ""
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    stack_bytes: int = 0
    tensor_cores: str = ""
    pickable: bool = True
    hot: list = dataclasses.field(default_factory=list)  # CUDA C++: HotPath per steady-state loop

    @property
    def shared_limit(self) -> int:
        return TARGETS[self.target][1]

    def failures(self) -> list[str]:
        """Why this row fails the gate (empty: it passes)."""
        if not self.pickable:
            return []
        reasons = []
        if self.status != "ok":
            reasons.append(f"does not compile: {self.error}")
        elif self.shared > self.shared_limit:
            reasons.append(f"needs {self.shared} B of shared memory, the limit is {self.shared_limit}")
        if self.status == "ok" and self.spill_bytes and self.dtype in ("bf16", "fp16"):
            reasons.append(f"spills {self.spill_bytes} B per thread")
        return reasons


# ------------------------------------------------------------------------------------------------ recording


class _Recorder:
    """Replaces every Triton autotuner's ``run`` with a recorder while the ops run on meta tensors."""

    def __init__(self) -> None:
        from triton.runtime.autotuner import Autotuner

        from fastalign.kernels.triton import distill, dpo_loss, linear_stats, logits_stats, policy_loss

        self.kernels = {
            name: obj
            for module in (linear_stats, logits_stats, policy_loss, dpo_loss, distill)
            for name, obj in vars(module).items()
            if isinstance(obj, Autotuner)
        }
        self.launches: list[Launch] = []
        self.dtype = ""
        self.case = ""

    @contextlib.contextmanager
    def recording(self, capability: int):
        import torch

        from fastalign.ops import _triton_backend, dispatch, logprobs, policy, preference

        def record(name):
            def run(*args, grid=None, warmup=False, **kwargs):
                # Pruned here, while the device queries answer for the target being recorded.
                kernel = self.kernels[name]
                keep = tuple(_pickable(kernel, args, kwargs))
                kernel.best_config = keep[0]  # what a launcher reads after a tuned run
                self.launches.append(Launch(name, args, kwargs, self.dtype, self.case, keep))

            return run

        def record_fixed(name):
            """A launch of the JIT function itself with a config the launcher chose (in-place gradients)."""

            def run(*args, grid=None, warmup=False, **kwargs):
                config = next(c for c in self.kernels[name].configs if c.all_kwargs().items() <= kwargs.items())
                kwargs = {k: v for k, v in kwargs.items() if k not in config.all_kwargs()}
                self.launches.append(Launch(name, args, kwargs, self.dtype, self.case, (config,)))

            return run

        def resolve(backend, device, dtype, op="linear_stats"):
            return "triton"

        saved = [(kernel, kernel.run) for kernel in self.kernels.values()]
        saved += [(kernel.fn, kernel.fn.run) for kernel in self.kernels.values()]
        patches = [
            (dispatch, "resolve_backend", resolve),
            (logprobs, "resolve_backend", resolve),
            (policy, "resolve_backend", resolve),
            (preference, "resolve_backend", resolve),
            (
                torch.cuda,
                "get_device_properties",
                lambda device=None: types.SimpleNamespace(
                    multi_processor_count=TARGETS[capability][2], shared_memory_per_block_optin=TARGETS[capability][1]
                ),
            ),
            (torch.cuda, "get_device_capability", lambda device=None: (capability // 10, capability % 10)),
            (_triton_backend, "_IN_PLACE_CONFIGS", {}),  # each target tunes its in-place launches afresh
        ]
        originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
        try:
            for name, kernel in self.kernels.items():
                kernel.run = record(name)
                kernel.fn.run = record_fixed(name)
            for module, name, value in patches:
                setattr(module, name, value)
            yield
        finally:
            for kernel, run in saved:
                kernel.run = run
            for module, name, value in originals:
                setattr(module, name, value)


def _meta(shape, dtype, grad=False):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def _cases() -> list[tuple[str, str, Callable[[], None]]]:
    """``(dtype label, case, run)``: each ``run`` calls public ops forward and backward on meta tensors."""
    import torch

    import fastalign

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32-tf32": torch.float32, "fp32-ieee": torch.float32}
    cases = []
    for label, dtype in dtypes.items():
        for n, d, v in LINEAR_SHAPES:
            for variant in ("ce", "logp+entropy+softcap+bias"):

                def linear(n=n, d=d, v=v, dtype=dtype, variant=variant):
                    hidden, weight = _meta((n, d), dtype, True), _meta((v, d), dtype, True)
                    targets = _meta((n,), torch.long)
                    if variant == "ce":
                        fastalign.linear_cross_entropy(hidden, weight, targets, backend="triton").backward()
                    else:
                        bias = _meta((v,), dtype, True)
                        logp, entropy = fastalign.linear_logprobs(
                            hidden,
                            weight,
                            targets,
                            bias=bias,
                            softcap=30.0,
                            temperature=0.7,
                            return_entropy=True,
                            backend="triton",
                        )
                        (logp.sum() + entropy.sum()).backward()

                cases.append((label, f"linear N={n} D={d} V={v} {variant}", linear))
                # The tile backward (set_linear_backward("tiles")): atomic, and ordered behind its tickets.
                for deterministic in (False, True):

                    def tiles(linear=linear, deterministic=deterministic):
                        fastalign.set_linear_backward("tiles", deterministic=deterministic)
                        try:
                            linear()
                        finally:
                            fastalign.set_linear_backward(None)

                    mode = "tiles deterministic" if deterministic else "tiles"
                    cases.append((label, f"linear N={n} D={d} V={v} {variant} {mode}", tiles))
        for n, ds, dt, v in DISTILL_SHAPES:
            for beta in DISTILL_BETAS:

                def distill(n=n, ds=ds, dt=dt, v=v, dtype=dtype, beta=beta):
                    student_hidden, student_weight = _meta((n, ds), dtype, True), _meta((v, ds), dtype, True)
                    teacher_hidden, teacher_weight = _meta((n, dt), dtype), _meta((v, dt), dtype)
                    fastalign.linear_distill_loss(
                        student_hidden,
                        student_weight,
                        teacher_hidden,
                        teacher_weight,
                        _meta((n,), torch.long),
                        beta=beta,
                        temperature=0.9,
                        backend="triton",
                    ).backward()

                cases.append((label, f"distill N={n} Ds={ds} Dt={dt} V={v} beta={beta}", distill))
    for label in ("bf16", "fp16", "fp32-tf32"):
        dtype = dtypes[label]
        for n, v in LOGITS_SHAPES:
            for inplace in (False, True):

                def from_logits(n=n, v=v, dtype=dtype, inplace=inplace):
                    logits = _meta((n, v), dtype, True)
                    source = logits.clone() if inplace else logits  # in place needs a non-leaf
                    logp, entropy = fastalign.logprobs_from_logits(
                        source,
                        _meta((n,), torch.long),
                        return_entropy=True,
                        inplace_backward=inplace,
                        backend="triton",
                    )
                    (logp.sum() + entropy.sum()).backward()

                cases.append((label, f"logits N={n} V={v}{' in-place' if inplace else ''}", from_logits))
        for b, t in POLICY_SHAPES:
            for name, objective in POLICY_VARIANTS.items():

                def policy(b=b, t=t, dtype=dtype, objective=objective):
                    logp, entropy = _meta((b, t), dtype, True), _meta((b, t), dtype, True)
                    loss, _ = fastalign.policy_loss(
                        logp,
                        _meta((b, t), torch.float32),
                        _meta((b,), torch.float32),
                        _meta((b, t), torch.bool),
                        ref_logps=_meta((b, t), torch.float32),
                        entropy=entropy,
                        kl_coef=0.04,
                        entropy_coef=0.01,
                        backend="triton",
                        **objective,
                    )
                    loss.backward()

                cases.append((label, f"policy B={b} T={t} {name} kl+entropy", policy))
        for pairs, t in DPO_SHAPES:

            def dpo(pairs=pairs, t=t, dtype=dtype):
                token_logps = _meta((2 * pairs, t), dtype, True)
                losses, _, _ = fastalign.dpo_loss_from_token_logps(
                    token_logps,
                    _meta((2 * pairs, t), torch.bool),
                    _meta((2 * pairs,), torch.float32),
                    loss_type=["sigmoid", "ipo"],
                    backend="triton",
                )
                losses.sum().backward()

            cases.append((label, f"dpo pairs={pairs} T={t} sigmoid+ipo", dpo))
    return cases


def record_launches(capability: int) -> tuple[_Recorder, list[Launch]]:
    import torch

    recorder = _Recorder()
    with recorder.recording(capability):
        for label, case, run in _cases():
            recorder.dtype, recorder.case = label, case
            torch.backends.cuda.matmul.allow_tf32 = label != "fp32-ieee"
            run()
    torch.backends.cuda.matmul.allow_tf32 = False
    return recorder, recorder.launches


# ------------------------------------------------------------------------------------------------ compiling


class _Pointer:
    """What triton's binder needs of a tensor: its dtype and address (alignment decides specialisation)."""

    def __init__(self, tensor) -> None:
        self.dtype = tensor.dtype
        # torch's CUDA caching allocator hands out 512-byte aligned blocks; a view adds its offset.
        self._address = 512 + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def _prepare(kernel, args, kwargs, config, capability):
    """triton's own binding of this launch for ``config`` on ``capability``: ``(source, target, options)``."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kernel.fn
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {
        **kwargs,
        **config.all_kwargs(),
        "debug": False,
        "instrumentation_mode": "",
        "fpsan_homomorphic_casts": False,
    }
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options


def _pickable(kernel, args, kwargs) -> list:
    """The configs the kernel's autotuner can pick for this launch (after its own pruning)."""
    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune:
        named = dict(zip(kernel.arg_names, args, strict=False))
        configs = list(prune(configs, named, **kwargs))
    return configs


_WORK: list[tuple] = []  # the jobs, set before the pool forks (kernels and meta tensors do not pickle)


def _compile_index(index: int) -> Row:
    return compile_row(_WORK[index])


def compile_row(job: tuple) -> Row:
    """Compile one (kernel, launch, config, target, pickable); never raises."""
    kernel, launch, config, capability, pickable = job
    from triton import knobs
    from triton.compiler import compile as triton_compile

    row = Row(launch.kernel, capability, _config_text(config), launch.dtype, launch.case, pickable=pickable)
    try:
        source, target, options = _prepare(kernel, launch.args, launch.kwargs, config, capability)
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cached kernel has no ptxas log: registers and spills unseen
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton_compile(source, target=target, options=options.__dict__)
    except Exception as error:  # a compile error is a result to report, not a crash
        row.status, row.error = "error", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return row
    text = log.getvalue()
    row.shared = compiled.metadata.shared
    if match := _REGISTERS.search(text):
        row.registers = int(match.group(1))
    if match := _SPILLS.search(text):
        row.stack_bytes = int(match.group(1))
        row.spill_bytes = int(match.group(2)) + int(match.group(3))
    if launch.kernel in MATMUL_KERNELS:
        ptx = compiled.asm["ptx"]
        row.tensor_cores = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none (FMA)")
    return row


def _config_text(config) -> str:
    blocks = ",".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _launch_key(kernel, launch, config, capability) -> str:
    source, _, options = _prepare(kernel, launch.args, launch.kwargs, config, capability)
    return f"{source.hash()}-{sorted(options.__dict__.items())}-{capability}"


def triton_rows(recorded: dict, fast: bool, jobs: int, log=print) -> list[Row]:
    """Compile the launches ``recorded`` per target (``{capability: record_launches(capability)}``)."""
    # The same launch on each target: the n-th launch of a kernel in a case and dtype.
    picks: dict[tuple, list] = {}
    for _, launches in recorded.values():
        counts: dict[tuple, int] = {}
        for launch in launches:
            slot = (launch.kernel, launch.case, launch.dtype)
            counts[slot] = counts.get(slot, -1) + 1
            picks.setdefault((*slot, counts[slot]), []).extend(launch.pickable)
    work = []
    for capability, (recorder, launches) in recorded.items():
        seen = set()
        covered = set()
        counts = {}
        for launch in launches:
            kernel = recorder.kernels[launch.kernel]
            keep = list(launch.pickable)
            slot = (launch.kernel, launch.case, launch.dtype)
            counts[slot] = counts.get(slot, -1) + 1
            # Also compiled, to show why they are pruned here: what the same launch may pick on the other targets.
            others = [c for c in picks[(*slot, counts[slot])] if c not in keep]
            configs = [(c, True) for c in keep] + [(c, False) for c in dict.fromkeys(others)]
            if fast:  # one config per kernel and target, the first the launcher can pick
                if launch.kernel in covered or not keep:
                    continue
                configs = [(keep[0], True)]
                covered.add(launch.kernel)
            for config, pickable in configs:
                key = _launch_key(kernel, launch, config, capability)
                if key in seen:
                    continue
                seen.add(key)
                work.append((kernel, launch, config, capability, pickable))
    log(f"bench.aot: {len(work)} distinct Triton compiles")
    rows = []
    start = time.perf_counter()
    if jobs > 1:
        _WORK[:] = work
        context = multiprocessing.get_context("fork")  # the workers inherit the kernels and the launches
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            for index, row in enumerate(pool.map(_compile_index, range(len(work))), start=1):
                rows.append(row)
                if index % 20 == 0 or index == len(work):
                    log(f"  {index}/{len(work)} compiled ({time.perf_counter() - start:.0f} s)")
    else:
        for index, job in enumerate(work, start=1):
            rows.append(compile_row(job))
            if index % 20 == 0 or index == len(work):
                log(f"  {index}/{len(work)} compiled ({time.perf_counter() - start:.0f} s)")
    return rows


# ------------------------------------------------------------------------------------------------ CUDA C++

_PTXAS_FUNCTION = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_PTXAS_SHARED = re.compile(r"(\d+) bytes smem")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_SASS_REGISTER = re.compile(r"(?<![\w.])R(\d+)(\.64)?")
_NOT_WRITING = ("ST", "BRA", "EXIT", "CALL", "RET", "BAR", "BSSY", "BSYNC", "RED", "WARPSYNC")
# Bytes of the element types that appear as template arguments of the kernels.
_TYPE_BYTES = {
    "float": 4,
    "__half": 2,
    "__nv_bfloat16": 2,
    "unsigned char": 1,
    "unsigned short": 2,
    "unsigned int": 4,
    "unsigned long long": 8,
}


@dataclasses.dataclass(frozen=True)
class Sass:
    """One SASS instruction: address, guard predicate, opcode with its modifiers, operand text."""

    addr: int
    pred: str
    op: str
    operands: str

    @property
    def target(self) -> int | None:
        if self.op.startswith(("BRA", "CALL")):
            match = re.search(r"0x([0-9a-f]+)\s*$", self.operands)
            return int(match.group(1), 16) if match else None
        return None

    @property
    def width(self) -> int:
        """Bytes per thread of a memory access."""
        for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
            if suffix in self.op:
                return size
        return 4

    def is_load(self, width: int = 0) -> bool:
        return self.op.startswith("LDG") and self.width >= width

    def is_store(self, width: int = 0) -> bool:
        return self.op.startswith("STG") and self.width >= width

    @staticmethod
    def _registers(text: str) -> set[int]:
        found = set()
        for match in _SASS_REGISTER.finditer(text):
            first = int(match.group(1))
            found.update((first, first + 1) if match.group(2) else (first,))
        return found

    def written(self) -> set[int]:
        if self.op.startswith(_NOT_WRITING):
            return set()
        registers = self._registers(self.operands.split(",")[0])
        if self.is_load() and registers:  # a vector load writes width / 4 consecutive registers
            return set(range(min(registers), min(registers) + max(1, self.width // 4)))
        return registers

    def read(self) -> set[int]:
        if self.op.startswith(_NOT_WRITING):
            return self._registers(self.operands)
        return self._registers(",".join(self.operands.split(",")[1:]))


def parse_sass(text: str) -> dict[str, list[Sass]]:
    """``cuobjdump --dump-sass`` text -> mangled function name -> its instructions (NOPs left out)."""
    functions: dict[str, list[Sass]] = {}
    current = None
    for line in text.splitlines():
        if match := _SASS_FUNCTION.match(line):
            current = functions.setdefault(match.group(1), [])
        elif current is not None and (match := _SASS_INSTRUCTION.match(line)) and match.group(3) != "NOP":
            current.append(
                Sass(int(match.group(1), 16), (match.group(2) or "").strip(), match.group(3), match.group(4).strip())
            )
    return functions


def _successors(code: list[Sass], index: int, lo: int, hi: int, where: dict[int, int]) -> list[int]:
    """Instructions code[index] can pass control to, kept inside code[lo..hi] (a branch out leaves the region)."""
    ins = code[index]
    unconditional = not ins.pred and (
        ins.op.startswith(("EXIT", "RET")) or (ins.op.startswith("BRA") and "," not in ins.operands)
    )
    nexts = []
    if ins.op.startswith("BRA") and ins.target in where and lo <= where[ins.target] <= hi:
        nexts.append(where[ins.target])
    if not unconditional and index + 1 <= hi:
        nexts.append(index + 1)
    return nexts


def shortest_path(code: list[Sass], start: int, end: int, lo: int, hi: int) -> list[Sass] | None:
    """The path from code[start] to code[end] through the fewest instructions, inside code[lo..hi]: the steady
    state, where the rare branches (a new running max, a slow-path division, an unaligned row) are not taken."""
    where = {ins.addr: i for i, ins in enumerate(code)}
    distance, previous, heap = {start: 1}, {}, [(1, start)]
    while heap:
        d, i = heapq.heappop(heap)
        if i == end:
            path = [i]
            while path[-1] != start:
                path.append(previous[path[-1]])
            return [code[j] for j in reversed(path)]
        if d > distance[i]:
            continue
        for j in _successors(code, i, lo, hi, where):
            if j != start and d + 1 < distance.get(j, 1 << 60):
                distance[j], previous[j] = d + 1, i
                heapq.heappush(heap, (d + 1, j))
    return None


def innermost_loops(code: list[Sass]) -> list[tuple[int, int]]:
    """(head, back-edge branch) indices of the loops with no other loop inside."""
    where = {ins.addr: i for i, ins in enumerate(code)}
    edges = [
        (where[ins.target], i)
        for i, ins in enumerate(code)
        if ins.op.startswith("BRA") and ins.target is not None and ins.target <= ins.addr and ins.target in where
    ]
    return [(h, e) for h, e in edges if not any(h <= h2 and e2 <= e and (h2, e2) != (h, e) for h2, e2 in edges)]


def loads_in_flight(path: list[Sass]) -> int:
    """The most 16-byte global loads issued, in path order, before the first of them has its result read."""
    best = 0
    for i, ins in enumerate(path):
        if not ins.is_load(16):
            continue
        dest, count = ins.written(), 1
        for other in path[i + 1 :]:
            if other.read() & dest or other.written() & dest:
                break
            count += other.is_load(16)
        best = max(best, count)
    return best


@dataclasses.dataclass(frozen=True)
class HotPath:
    kind: str  # "loop": a vector loop's iteration; "thread": entry to a thread's last 16-byte store; "scalar"
    instructions: int
    elements: float
    in_flight: int

    @property
    def per_element(self) -> float:
        return self.instructions / self.elements if self.elements else float("nan")


def _template_types(name: str) -> list[int]:
    match = re.search(r"<(.*?)>", name)
    return [
        _TYPE_BYTES[arg.strip()] for arg in (match.group(1).split(",") if match else []) if arg.strip() in _TYPE_BYTES
    ]


def hot_paths(code: list[Sass], name: str) -> list[HotPath]:
    """The steady-state work of a kernel, counted in SASS instructions per element (``name``: demangled, for the
    element types among its template arguments).

    - ``loop``: every innermost loop with a 16-byte global load, one iteration along its fewest-instruction path;
      elements = the bytes it loads / the bytes of one element of each input (the template's element types).
    - ``thread``: kernels without such a loop (one thread, a few vectors): the fewest-instruction path from the
      entry through the first 16-byte global load (when there is one), then on to each next reachable 16-byte
      store (a thread's every vector); elements = the bytes of 16-byte stores / the output element's bytes.
    - ``scalar``: neither (a rolled loop of scalar loads): the static size of the largest innermost loop, one
      element per iteration.
    """
    sizes = _template_types(name)
    found = []
    for head, edge in innermost_loops(code):
        if not any(ins.is_load(16) for ins in code[head : edge + 1]):
            continue
        path = shortest_path(code, head, edge, head, edge)
        if path and any(ins.is_load(16) for ins in path) and sizes:
            loaded = sum(ins.width for ins in path if ins.is_load())
            found.append(HotPath("loop", len(path), loaded / sum(sizes), loads_in_flight(path)))
    if found:
        return found
    loads = [i for i, ins in enumerate(code) if ins.is_load(16)]
    stores = [i for i, ins in enumerate(code) if ins.is_store(16)]
    if stores and sizes:
        # Through the first 16-byte load when there is one (not a shortcut that only stores), then from store to
        # the next reachable 16-byte store while there is one: all of a thread's vectors.
        # (the first load from which a 16-byte store is reachable: the compiler may unswitch the body into
        # variants, some of them without vector stores)
        reach = [i for i in loads if any(shortest_path(code, i, end, 0, len(code) - 1) for end in stores if end > i)]
        at = reach[0] if reach else 0
        path = shortest_path(code, 0, at, 0, len(code) - 1)
        while path:
            step = next(
                (p for p in (shortest_path(code, at, end, 0, len(code) - 1) for end in stores if end > at) if p), None
            )
            if step is None:
                break
            path, at = path[:-1] + step, code.index(step[-1])
        if path and any(ins.is_store(16) for ins in path):
            stored = sum(ins.width for ins in path if ins.is_store(16))
            return [HotPath("thread", len(path), stored / sizes[0], loads_in_flight(path))]
    loops = [(e - h + 1, h, e) for h, e in innermost_loops(code) if any(ins.is_load() for ins in code[h : e + 1])]
    if loops:
        size, head, edge = max(loops)
        return [HotPath("scalar", size, 1.0, loads_in_flight(code[head : edge + 1]))]
    return []


def _cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    with contextlib.suppress(ImportError):
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def _demangle(name: str) -> str:
    """The function's name and template arguments (not its parameter list)."""
    filt = shutil.which("c++filt")
    if not filt:
        return name
    text = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name
    text = text.removeprefix("void ").replace("(anonymous namespace)::", "")
    if text.endswith(")"):  # cut the trailing parameter list at its matching "("
        depth = 0
        for i in range(len(text) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(text[i], 0)
            if depth == 0:
                return text[:i]
    return text


def cuda_rows(capabilities, log=print, source_root: Path = ROOT) -> list[Row]:
    """``nvcc -Xptxas -v`` on each ``csrc/cuda/*.cu`` of ``source_root`` for each target: one row per kernel and
    target, with its steady-state SASS instructions per element (``cuobjdump --dump-sass``, :func:`hot_paths`)."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        log("bench.aot: no nvcc: the CUDA C++ rows are left out")
        return []
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        log("bench.aot: no cuobjdump: the CUDA C++ rows have no SASS counts")
    rows = []
    for source in sorted((source_root / "csrc" / "cuda").glob("*.cu")):
        for capability in capabilities:
            with tempfile.TemporaryDirectory() as tmp:
                command = [
                    nvcc,
                    "-O3",
                    "-std=c++17",
                    "-lineinfo",
                    f"-I{source_root / 'csrc' / 'include'}",
                    f"-gencode=arch=compute_{capability},code=sm_{capability}",
                    "-Xptxas",
                    "-v",
                    "-c",
                    str(source),
                    "-o",
                    str(Path(tmp) / "out.o"),
                ]
                done = subprocess.run(command, capture_output=True, text=True)
                sass = {}
                if done.returncode == 0 and cuobjdump:
                    dump = subprocess.run(
                        [cuobjdump, "--dump-sass", str(Path(tmp) / "out.o")], capture_output=True, text=True
                    )
                    sass = parse_sass(dump.stdout)
            case = f"csrc/cuda/{source.name}"
            if done.returncode != 0:
                rows.append(
                    Row(
                        source.stem,
                        capability,
                        "-",
                        "-",
                        case,
                        status="error",
                        error=(done.stderr.strip().splitlines() or ["nvcc failed"])[-1][:160],
                    )
                )
                continue
            current = None
            for line in done.stderr.splitlines():
                if match := _PTXAS_FUNCTION.search(line):
                    current = Row(_demangle(match.group(1)), capability, "-", "-", case)
                    current.hot = hot_paths(sass.get(match.group(1), []), current.kernel)
                    rows.append(current)
                elif current is not None:
                    if match := _SPILLS.search(line):
                        current.stack_bytes = int(match.group(1))
                        current.spill_bytes = int(match.group(2)) + int(match.group(3))
                    if match := _REGISTERS.search(line):
                        current.registers = int(match.group(1))
                    if match := _PTXAS_SHARED.search(line):
                        current.shared = int(match.group(1))
    return rows


def sass_target_failures(row: Row) -> list[str]:
    """Issue 15's machine-code targets: the bf16 logprobs forward at most 12 SASS instructions per element without
    a softcap and 20 with one; every logprobs backward with at least 4 16-byte loads in flight per thread."""
    if row.status != "ok" or not row.hot:
        return []
    best = min(row.hot, key=lambda path: (path.per_element, -path.in_flight))
    if match := re.fullmatch(r"fastalign::logprobs_fwd_kernel<__nv_bfloat16, (\d+)u>", row.kernel):
        limit = 20 if int(match.group(1)) & 1 else 12
        if best.per_element > limit:
            return [f"{best.per_element:.1f} SASS instructions per element (target <= {limit})"]
    if row.kernel.startswith("fastalign::logprobs_bwd_kernel<") and best.in_flight < 4:
        return [f"{best.in_flight} 16-byte loads in flight per thread (target >= 4)"]
    return []


def cuda_failures(rows: list[Row]) -> list[str]:
    return [
        f"{row.kernel} sm_{row.target}: {reason}"
        for row in rows
        for reason in (
            [f"does not compile: {row.error}"]
            if row.status != "ok"
            else [f"spills {row.spill_bytes} B"]
            if row.spill_bytes
            else sass_target_failures(row)
        )
    ]


# ------------------------------------------------------------------------------------------------ report


def _environment() -> dict[str, str]:
    nvcc = shutil.which("nvcc")
    nvcc_version = ""
    if nvcc:
        nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        nvcc_version = nvcc_version[-1] if nvcc_version else ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "triton": package_version("triton"),
        "torch": package_version("torch"),
        "nvcc": nvcc_version,
        "machine": "compiled without a GPU (triton.compile with a GPUTarget; nvcc -Xptxas -v)",
    }


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:.0f}"


def markdown(
    triton: list[Row], cuda: list[Row], env: dict[str, str], seconds: float, baseline: tuple[str, list] | None = None
) -> str:
    failures = gate(triton, cuda, with_case=False)
    lines = [
        "# Ahead-of-time compile gate: every GPU kernel for sm_80 and sm_90",
        "",
        f"`python -m bench.aot` ({env['date']}; triton {env['triton']}, torch {env['torch']}, {env['nvcc']}; "
        f"{env['machine']}; {seconds:.0f} s).",
        "",
        "Each Triton launch the ops make at the sizes below was recorded on meta tensors and compiled with every "
        "autotune config, through triton's own argument binder. *pickable*: the kernel's pruning keeps the config "
        "for this dtype and target (the others are listed to show why they are pruned). Shared memory in KiB "
        "against the per-block limit (A100 163, H100 227); spills = ptxas spill stores + loads per thread.",
        "",
        "Shapes: linear N, D, V = "
        + "; ".join(f"{n}, {d}, {v}" for n, d, v in LINEAR_SHAPES)
        + "; logits N, V = "
        + "; ".join(f"{n}, {v}" for n, v in LOGITS_SHAPES)
        + "; policy B, T = "
        + "; ".join(f"{b}, {t}" for b, t in POLICY_SHAPES)
        + "; DPO pairs, T = "
        + "; ".join(f"{b}, {t}" for b, t in DPO_SHAPES)
        + "; distillation N, student D, teacher D, V = "
        + "; ".join(f"{n}, {ds}, {dt}, {v}" for n, ds, dt, v in DISTILL_SHAPES)
        + f" at beta {', '.join(map(str, DISTILL_BETAS))}.",
        "",
        f"**Gate: {'PASSED' if not failures else 'FAILED'}** ({len(triton)} Triton compiles, {len(cuda)} CUDA "
        "kernels).",
    ]
    if failures:
        lines += ["", *[f"- {failure}" for failure in failures]]
    lines += [
        "",
        "## Triton",
        "",
        "| kernel | target | config | dtype | pickable | status | smem KiB | regs | spill B | tensor cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    merged: dict[tuple, list[Row]] = {}
    for row in triton:  # one line per kernel x target x config x dtype; the cases it covers are the same code
        merged.setdefault((row.kernel, row.target, row.config, row.dtype), []).append(row)
    for (kernel, target, config, dtype), group in sorted(merged.items()):
        worst = max(group, key=lambda r: (r.status != "ok", r.spill_bytes, r.shared, r.registers))
        pickable = "yes" if any(r.pickable for r in group) else "pruned"
        status = "ok" if worst.status == "ok" else f"error: {worst.error}"
        lines.append(
            f"| {kernel} | sm_{target} | {config} | {dtype} | {pickable} | {status} | {_kib(worst.shared)} | "
            f"{worst.registers} | {worst.spill_bytes} | {worst.tensor_cores or '-'} |"
        )
    lines += [
        "",
        "## CUDA C++ (`csrc/cuda`, nvcc -O3 -Xptxas -v, cuobjdump --dump-sass)",
        "",
        SASS_LEGEND,
        "",
        "| kernel | source | target | status | regs | spill B | stack B | smem B | SASS path | instr/elem | "
        "16-B loads in flight |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in cuda:
        status = "ok" if row.status == "ok" else f"error: {row.error}"
        lines.append(
            f"| `{row.kernel}` | {row.case} | sm_{row.target} | {status} | {row.registers} | "
            f"{row.spill_bytes} | {row.stack_bytes} | {row.shared} | {_sass_cells(row.hot)} |"
        )
    if baseline:
        ref, rows = baseline
        lines += [
            "",
            f"### Before: the kernels of `{ref}`",
            "",
            BASELINE_LEGEND,
            "",
            "| kernel | target | variant | SASS path | instr/elem | 16-B loads in flight |",
            "|---|---|---|---|---|---|",
        ]
        for variant, row in rows:
            lines.append(f"| `{row.kernel}` | sm_{row.target} | {variant} | {_sass_cells(row.hot)} |")
    return "\n".join(lines) + "\n"


SASS_LEGEND = (
    "SASS columns, counted from `cuobjdump --dump-sass` by `bench.aot.hot_paths`: *loop* = one iteration of each "
    "innermost loop that makes a 16-byte global load, along its fewest-instruction path (the steady state: no new "
    "running max, no slow-path division, aligned rows), divided by the elements it covers (bytes loaded / bytes "
    "per element of each input); *thread* = kernels without such a loop, from the entry through the first 16-byte "
    "load to each next 16-byte store (all of a thread's vectors), divided by the elements stored; *scalar* = a "
    "rolled loop of scalar loads, one token per iteration (its static size, all dtype branches included). Several "
    "loops (one per row and per alignment variant): the one with the fewest instructions per element, the aligned "
    "steady state. *16-B loads in flight*: the most 16-byte loads issued, in path order, before the "
    "first of them has its result read."
)
BASELINE_LEGEND = (
    "The same count on the commit named, sm_90. Its kernels chose softcap and the all-zero-row shortcut at run "
    "time, so the fewest-instruction path would be the shortcut: *plain* compiles it with the shortcut off (the "
    "path of a row that has a gradient), *softcap* also with the softcap on (`bench.aot.BASELINE_PATCHES`)."
)
# Applied to a baseline's sources only (each where found): see BASELINE_LEGEND.
BASELINE_PATCHES = {
    "plain": [("if (zero) return 0.0f;", "if (false) return 0.0f;")],
    "softcap": [
        ("if (zero) return 0.0f;", "if (false) return 0.0f;"),
        ("if (has_softcap) z = softcap", "if (true) z = softcap"),
        ("if (!has_softcap) return inv_temperature;", "if (false) return inv_temperature;"),
    ],
}


def _sass_cells(hot: list) -> str:
    if not hot:
        return "- | - | -"
    kinds = sorted({path.kind for path in hot})
    best = min(hot, key=lambda path: (path.per_element, -path.in_flight))
    return f"{'/'.join(kinds)} x{len(hot)} | {best.per_element:.1f} | {best.in_flight}"


def baseline_rows(ref: str, capability: int = 90, log=print) -> list[tuple[str, Row]]:
    """:func:`cuda_rows` for ``csrc/`` at git ``ref``, once per :data:`BASELINE_PATCHES` variant."""
    rows = []
    for variant, patches in BASELINE_PATCHES.items():
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "archive", ref, "csrc"], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "x"], cwd=tmp, input=archive.stdout, check=True)
            for path in (Path(tmp) / "csrc").rglob("*"):
                if path.suffix in (".h", ".cu", ".cuh"):
                    text = path.read_text()
                    for old, new in patches:
                        text = text.replace(old, new)
                    path.write_text(text)
            rows += [
                (variant, row)
                for row in cuda_rows([capability], log, source_root=Path(tmp))
                if "logprobs" in row.case or variant == "plain"
            ]
    return rows


def gate(triton: list[Row], cuda: list[Row], with_case: bool = True) -> list[str]:
    """Every reason to fail, once per kernel x target x config x dtype (with the first case that shows it)."""
    failures = {}
    for row in triton:
        for reason in row.failures():
            key = (row.kernel, row.target, row.config, row.dtype, reason.split(":")[0])
            where = f" ({row.case})" if with_case else ""
            failures.setdefault(key, f"{row.kernel} sm_{row.target} {row.config} {row.dtype}{where}: {reason}")
    return [*failures.values(), *cuda_failures(cuda)]


def pickable_configs(recorded: dict) -> set[tuple[str, str, str, str]]:
    """``(kernel, target, config, dtype)`` of every config the launchers can pick, as the table writes them."""
    return {
        (launch.kernel, f"sm_{capability}", _config_text(config), launch.dtype)
        for capability, (_, launches) in recorded.items()
        for launch in launches
        for config in launch.pickable
    }


def table_configs(path: Path) -> set[tuple[str, str, str, str]]:
    """The same, read from the pickable rows of a table this module wrote."""
    rows = set()
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[4] == "yes":
            rows.add(tuple(cells[:4]))
    return rows


def stale_table(recorded: dict, path: Path) -> list[str]:
    """Why ``path`` no longer describes the kernels (empty: it does)."""
    if not path.exists():
        return [f"{path} is missing: run python -m bench.aot"]
    now, table = pickable_configs(recorded), table_configs(path)
    reasons = [f"pickable now but not in {path.name}: {' '.join(row)}" for row in sorted(now - table)]
    reasons += [f"in {path.name} but no longer pickable: {' '.join(row)}" for row in sorted(table - now)]
    return reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="one config per kernel and target (the CI subset)")
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)")
    parser.add_argument("--output", type=Path, help=f"the markdown table (default without --fast: {DEFAULT_OUTPUT})")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the csrc/ kernels")
    parser.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also count the SASS of csrc/ at GIT_REF (sm_90): the table's before section",
    )
    parser.add_argument(
        "--check-table",
        type=Path,
        metavar="PATH",
        help="also fail when the table at PATH does not list exactly the configs the launchers can "
        "pick now (a config change without a new full run)",
    )
    options = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it (the interpreter cannot compile for a GPU target)")
    capabilities = [int(c) for c in options.targets.split(",")]
    unknown = [c for c in capabilities if c not in TARGETS]
    if unknown:
        parser.error(f"--targets: {unknown} unknown; known: {sorted(TARGETS)}")
    start = time.perf_counter()
    recorded = {capability: record_launches(capability) for capability in capabilities}
    stale = stale_table(recorded, options.check_table) if options.check_table else []
    triton = triton_rows(recorded, options.fast, max(1, options.jobs))
    cuda = [] if options.no_cuda else cuda_rows(capabilities)
    baseline = (options.baseline, baseline_rows(options.baseline)) if options.baseline and not options.no_cuda else None
    seconds = time.perf_counter() - start
    output = options.output or (None if options.fast else DEFAULT_OUTPUT)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(markdown(triton, cuda, _environment(), seconds, baseline))
        print(f"bench.aot: wrote {output}")
    failures = gate(triton, cuda) + stale
    for failure in failures:
        print(f"bench.aot: FAIL {failure}", file=sys.stderr)
    print(
        f"bench.aot: {len(triton)} Triton compiles, {len(cuda)} CUDA kernels, {len(failures)} failures, {seconds:.0f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
