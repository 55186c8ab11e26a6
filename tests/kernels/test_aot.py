"""The ahead-of-time compile gate (``python -m bench.aot``): every GPU kernel compiles for sm_80 and sm_90 here.

The gate itself runs in a subprocess without ``TRITON_INTERPRET`` (this suite sets it, and under the interpreter
``@triton.jit`` builds interpreter functions that cannot be compiled for a GPU target).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import aot

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "bench" / "results" / "aot-sm80-sm90.md"


def run_without_interpreter(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_every_kernel_compiles_for_sm80_and_sm90_and_the_table_is_current():
    """The CI subset: one config per Triton kernel and target, every csrc/ kernel (when nvcc is here), and the
    committed table lists exactly the configs the launchers can pick now."""
    done = run_without_interpreter("-m", "bench.aot", "--fast", "--jobs", "2", "--check-table", str(TABLE))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " 0 failures" in summary, summary
    assert "26 Triton compiles" in summary, summary  # 13 kernels x 2 targets
    if shutil.which("nvcc"):
        assert " 0 CUDA kernels" not in summary, summary


def test_the_gate_fails_a_config_that_exceeds_shared_memory():
    """A real compile: 256 x 256 x 64 bf16 tiles in 4 stages need 256 KiB of shared memory on sm_90 (> 227)."""
    script = textwrap.dedent(
        """
        import triton
        from bench import aot

        recorded = {90: aot.record_launches(90)}
        recorder, launches = recorded[90]
        launch = next(l for l in launches if l.kernel == "linear_stats_fwd_kernel" and l.dtype == "bf16")
        config = triton.Config({"BLOCK_N": 256, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=4)
        row = aot.compile_row((recorder.kernels[launch.kernel], launch, config, 90, True))
        print(row.status, row.shared, row.failures())
        """
    )
    done = run_without_interpreter("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    status, shared, *failures = done.stdout.strip().splitlines()[-1].split(" ", 2)
    assert status == "ok" and int(shared) > 227 * 1024
    assert "shared memory" in failures[0]


def row(**fields) -> aot.Row:
    base = {"kernel": "k", "target": 90, "config": "c", "dtype": "bf16", "case": "case"}
    return aot.Row(**{**base, **fields})


@pytest.mark.parametrize(
    "fields,reason",
    [
        ({"status": "error", "error": "CompilationError: x"}, "does not compile"),
        ({"shared": 227 * 1024 + 1}, "shared memory"),
        ({"target": 80, "shared": 163 * 1024 + 1}, "shared memory"),
        ({"spill_bytes": 8}, "spills"),
        ({"dtype": "fp16", "spill_bytes": 8}, "spills"),
    ],
)
def test_a_pickable_config_fails_the_gate(fields, reason):
    failures = row(**fields).failures()
    assert len(failures) == 1 and reason in failures[0]


@pytest.mark.parametrize(
    "fields",
    [
        {"shared": 227 * 1024},  # at the limit fits
        {"target": 80, "shared": 163 * 1024},
        {"dtype": "fp32-ieee", "spill_bytes": 64},  # float32 spills are reported, not gated
        {"spill_bytes": 400, "shared": 300 * 1024, "pickable": False},  # pruned: listed to show why
    ],
)
def test_what_passes_the_gate(fields):
    assert row(**fields).failures() == []


def test_the_table_lists_only_pickable_rows_that_pass():
    """The committed table passed the gate: no pickable row with a failure, every kernel family present."""
    assert TABLE.exists()
    text = TABLE.read_text()
    assert "**Gate: PASSED**" in text
    rows = aot.table_configs(TABLE)
    kernels = {kernel for kernel, *_ in rows}
    assert kernels == {
        "linear_stats_fwd_kernel", "linear_grad_logits_kernel", "matmul_accumulate_kernel", "logits_stats_fwd_kernel",
        "logits_grad_kernel", "policy_loss_fwd_kernel", "policy_loss_bwd_kernel", "dpo_fwd_kernel", "dpo_bwd_kernel",
        "distill_stats_kernel", "distill_mixture_kernel", "distill_grad_kernel", "linear_grad_tiles_kernel",
    }  # fmt: skip
    assert {target for _, target, _, _ in rows} == {"sm_80", "sm_90"}
    assert {dtype for *_, dtype in rows} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee"}


def test_ptxas_lines_are_read_as_registers_and_spills():
    log = (
        "ptxas info    : Function properties for linear_stats_fwd_kernel\n"
        "    264 bytes stack frame, 268 bytes spill stores, 268 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 640 bytes cmem[0]"
    )
    assert aot._REGISTERS.search(log).group(1) == "255"
    assert [int(g) for g in aot._SPILLS.search(log).groups()] == [264, 268, 268]


SASS = """
        Function : _Z6kernelI13__nv_bfloat16Lj0EEvv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   FADD R12, R4, R5 ;
        /*0040*/               @P0 BRA 0x70 ;
        /*0050*/                   MUFU.EX2 R12, R12 ;
        /*0060*/                   FMUL R12, R12, R12 ;
        /*0070*/                   FADD R13, R8, R12 ;
        /*0080*/                   NOP ;
        /*0090*/               @P1 BRA 0x10 ;
        /*00a0*/                   EXIT ;
"""


def test_sass_loops_are_counted_along_their_fewest_instruction_path():
    """One iteration: 2 16-byte loads of bf16 (16 elements), the rare branch (0x50-0x60) skipped, NOP not counted."""
    ((_, code),) = aot.parse_sass(SASS).items()
    (path,) = aot.hot_paths(code, "kernel<__nv_bfloat16, 0u>")
    assert (path.kind, path.instructions, path.elements, path.in_flight) == ("loop", 6, 16.0, 2)
    assert code[2].written() == {8, 9, 10, 11} and code[3].read() == {4, 5}


@pytest.mark.parametrize(
    "kernel,per_element,in_flight,fails",
    [
        ("fastalign::logprobs_fwd_kernel<__nv_bfloat16, 2u>", 12.0, 2, False),
        ("fastalign::logprobs_fwd_kernel<__nv_bfloat16, 2u>", 12.5, 2, True),  # no softcap: <= 12
        ("fastalign::logprobs_fwd_kernel<__nv_bfloat16, 3u>", 19.0, 2, False),  # softcap: <= 20
        ("fastalign::logprobs_fwd_kernel<__nv_bfloat16, 3u>", 21.0, 2, True),
        ("fastalign::logprobs_bwd_kernel<__half, true>", 30.0, 4, False),
        ("fastalign::logprobs_bwd_kernel<__half, true>", 15.0, 1, True),  # one load in flight
    ],
)
def test_the_gate_holds_the_cuda_kernels_to_their_machine_code_targets(kernel, per_element, in_flight, fails):
    cuda = row(kernel=kernel, config="-", dtype="-", hot=[aot.HotPath("loop", int(per_element * 16), 16.0, in_flight)])
    assert bool(aot.cuda_failures([cuda])) == fails


def test_the_committed_table_counts_the_cuda_kernels_before_and_after():
    """Every CUDA kernel has its SASS count; the 'before' section is there; the logprobs targets hold."""
    text = TABLE.read_text()
    assert "### Before: the kernels of `a9823fd`" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| `fastalign::")]
    after = [cells for cells in rows if len(cells) == 13]
    assert after and all(cells[10].strip() not in ("", "-") for cells in after)
    for cells in after:
        kernel, per_element, in_flight = cells[1].strip(" `"), float(cells[10]), int(cells[11])
        if kernel.startswith("fastalign::logprobs_fwd_kernel<__nv_bfloat16,"):
            assert per_element <= (20 if int(kernel.split(", ")[1][:-2]) & 1 else 12), cells
        if kernel.startswith("fastalign::logprobs_bwd_kernel<"):
            assert in_flight >= 4, cells
