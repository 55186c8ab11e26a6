"""Timing and peak memory of one case.

CPU: each case runs in a fresh process (``python -m bench.measure '<case json>'``). A tiny run of the same case
first pages in the library code; then the peak-RSS mark is reset (``/proc/self/clear_refs``) and the extra peak
memory is the peak RSS during one step minus the RSS just before it and minus the gradients of the inputs
(which every implementation must produce). The time is the median of later steps (at least
the preset's number, and more for short steps until about 3 s of samples).
GPU: in this process, ``triton.testing.do_bench`` (CUDA events) after warm-up: the median and the 10th and 90th
percentiles of the repeats; extra peak memory from ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before and minus the inputs' gradients; first, the forward's
output against eager's (``out_rel_err``; a case beyond the dtype's tolerance is not timed). A case that raises
(a peer that does not run with this torch, say) becomes a row with its error, so the other cases still run.
The same in-process path runs a rehearsal's CPU cases (``python -m bench --rehearse``), with host timers and no
memory figure.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.cases import Case, make_inputs, make_step, output_error, output_tolerance

MIN_SAMPLE_SECONDS = 3.0
MAX_REPEATS = 50
REPO_ROOT = Path(__file__).resolve().parent.parent
QUANTILES = (0.1, 0.5, 0.9)  # the spread reported beside each median: time_p10_ms, time_ms, time_p90_ms


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


def rss_baseline(release_free_heap: bool = True) -> int:
    """Start watching a step's peak RSS: collect garbage, hand the allocator's free pages back to the OS
    (``release_free_heap``: glibc's ``malloc_trim``, so that scratch the step allocates shows in its peak instead
    of landing unseen in pages that freed tensors left resident), reset the peak mark; return the RSS, in bytes.
    The step's peak is then :func:`peak_rss`."""
    gc.collect()
    if release_free_heap:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    _reset_peak_rss()
    return _memory_status("VmRSS")


def peak_rss() -> int:
    """The peak RSS since :func:`rss_baseline`, in bytes."""
    return _memory_status("VmHWM")


def run_in_fresh_process(module: str, *args: str) -> dict:
    """``python -m module *args`` in a fresh interpreter at the repository root (so earlier cases cannot inflate
    its peak RSS): the JSON its last stdout line holds, or ``{"error": its last stderr line}`` when it fails."""
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": (lines or [f"exit status {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    before = rss_baseline(release_free_heap=False)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    # Gradients may land in pages the allocator already held: clamp that page-level noise at 0.
    extra = max(0, peak_rss() - before - _gradient_bytes(inputs))
    # Short steps repeat until about MIN_SAMPLE_SECONDS of samples: single runs on a shared CPU vary widely.
    times = []
    while len(times) < repeats or (sum(times) < MIN_SAMPLE_SECONDS and len(times) < MAX_REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {**_spread([1e3 * t for t in times or [first]]), "peak_extra_mib": extra / 2**20}


def _spread(times_ms: list[float]) -> dict:
    """Median and 10th / 90th percentiles of host-timed repeats."""
    ordered = sorted(times_ms)

    def quantile(q: float) -> float:  # linear interpolation, as torch.quantile (what do_bench uses)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"time_ms": statistics.median(ordered), "time_p10_ms": quantile(0.1), "time_p90_ms": quantile(0.9)}


def measure_cpu(case: Case, repeats: int) -> dict:
    """Run one CPU case in a fresh interpreter, so earlier cases cannot inflate its peak RSS."""
    return run_in_fresh_process("bench.measure", json.dumps({**case.to_dict(), "repeats": repeats}))


def measure_gpu(case: Case, rehearsal_repeats: int = 3) -> dict:
    """One case in this process: CUDA events through ``do_bench`` on a CUDA case; on a CPU case (a rehearsal)
    ``rehearsal_repeats`` host-timed steps."""
    on_gpu = case.device == "cuda"
    inputs = step = None
    try:
        inputs = make_inputs(case)
        error = output_error(case, inputs)  # the forward against eager's, before any timing
        if error is not None and not error <= output_tolerance(case):  # NaN fails too
            return {"out_rel_err": error, "error": f"output differs from eager's: max rel. error {error:.3g}"}
        step = make_step(case, inputs)
        step()  # compile and autotune outside the measured window
        for tensor in inputs:
            tensor.grad = None  # the step allocates its gradients afresh, as on CPU
        extra = 0
        if on_gpu:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before - _gradient_bytes(inputs)
            import triton.testing

            p10, median, p90 = triton.testing.do_bench(step, warmup=100, rep=500, quantiles=list(QUANTILES))
            times = {"time_ms": median, "time_p10_ms": p10, "time_p90_ms": p90}
        else:
            times = []
            for _ in range(rehearsal_repeats):
                start = time.perf_counter()
                step()
                times.append(1e3 * (time.perf_counter() - start))
            times = _spread(times)
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    except Exception as error:  # one implementation failing must not end the benchmark
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}
    finally:
        del inputs, step
        if on_gpu:
            torch.cuda.empty_cache()
    return {**times, "peak_extra_mib": extra / 2**20, "out_rel_err": error}


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """The device's achievable DRAM bandwidth: a device-to-device copy of ``nbytes`` (2 GiB unless told; the
    core benchmark copies a tensor the size of its logits), counting bytes read and written."""
    import triton.testing

    source = torch.empty(nbytes // 2, dtype=torch.int16, device="cuda").random_()
    target = torch.empty_like(source)
    time_ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=25, rep=200, return_mode="median")
    return 2 * (nbytes // 2) * 2 / (time_ms / 1e3) / 1e9


def main() -> None:
    spec = json.loads(sys.argv[1])
    repeats = spec.pop("repeats")
    torch.manual_seed(0)
    print(json.dumps(measure_here_cpu(Case(**spec), repeats)))


if __name__ == "__main__":
    main()
