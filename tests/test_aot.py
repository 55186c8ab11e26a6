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

ROOT = Path(__file__).resolve().parents[1]
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
    assert "18 Triton compiles" in summary, summary  # 9 kernels x 2 targets
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
