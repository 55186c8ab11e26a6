"""Timing and peak memory of one case.

CPU: each case runs in a fresh process (``python -m bench.measure '<case json>'``). A tiny run of the same case
first pages in the library code; then the peak-RSS mark is reset (``/proc/self/clear_refs``) and the extra peak
memory is the peak RSS during one step minus the RSS just before it and minus the gradients of the inputs
(which every implementation must produce). The time is the median of later steps (at least
the preset's number, and more for short steps until about 3 s of samples).
GPU: in this process, ``triton.testing.do_bench`` median after warm-up; extra peak memory from
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before and minus
the inputs' gradients.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.cases import Case, make_inputs, make_step

MIN_SAMPLE_SECONDS = 3.0
MAX_REPEATS = 50


def _memory_status(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _gradient_bytes(inputs: tuple[torch.Tensor, ...]) -> int:
    """Memory of the inputs' gradients: every implementation must produce them, so they are not counted."""
    return sum(x.grad.numel() * x.grad.element_size() for x in inputs if x.grad is not None)


def measure_here_cpu(case: Case, repeats: int) -> dict:
    if case.t:  # two rows of a short sequence: one chosen/rejected pair for DPO
        tiny = dataclasses.replace(case, n=16, t=8, d=min(case.d, 64), v=min(case.v, 512))
    else:
        tiny = dataclasses.replace(case, n=min(case.n, 64), d=min(case.d, 64), v=min(case.v, 512))
    make_step(tiny, make_inputs(tiny))()
    inputs = make_inputs(case)
    step = make_step(case, inputs)
    gc.collect()
    _reset_peak_rss()
    before = _memory_status("VmRSS")
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    # Gradients may land in pages the allocator already held: clamp that page-level noise at 0.
    extra = max(0, _memory_status("VmHWM") - before - _gradient_bytes(inputs))
    # Short steps repeat until about MIN_SAMPLE_SECONDS of samples: single runs on a shared CPU vary widely.
    times = []
    while len(times) < repeats or (sum(times) < MIN_SAMPLE_SECONDS and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_ms": 1e3 * statistics.median(times or [first]), "peak_extra_mib": extra / 2**20}


def measure_cpu(case: Case, repeats: int) -> dict:
    """Run one CPU case in a fresh interpreter, so earlier cases cannot inflate its peak RSS."""
    command = [sys.executable, "-m", "bench.measure", json.dumps({**case.to_dict(), "repeats": repeats})]
    repo_root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=repo_root)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_gpu(case: Case) -> dict:
    import triton.testing

    inputs = make_inputs(case)
    step = make_step(case, inputs)
    try:
        step()  # compile and autotune outside the measured window
        for tensor in inputs:
            tensor.grad = None  # the step allocates its gradients afresh, as on CPU
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - _gradient_bytes(inputs)
        time_ms = triton.testing.do_bench(step, warmup=100, rep=500, return_mode="median")
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        del inputs, step
        torch.cuda.empty_cache()
    return {"time_ms": time_ms, "peak_extra_mib": extra / 2**20}


def copy_bandwidth_gbps() -> float:
    """The device's achievable DRAM bandwidth: a 2 GiB device-to-device copy, counting bytes read and written."""
    import triton.testing

    source = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    target = torch.empty_like(source)
    time_ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=25, rep=200, return_mode="median")
    return 2 * source.numel() * source.element_size() / (time_ms / 1e3) / 1e9


def main() -> None:
    spec = json.loads(sys.argv[1])
    repeats = spec.pop("repeats")
    torch.manual_seed(0)
    print(json.dumps(measure_here_cpu(Case(**spec), repeats)))


if __name__ == "__main__":
    main()
