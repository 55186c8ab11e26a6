"""``python -m bench``: time forward and forward+backward, and peak memory, of fastalign's core ops against the
eager baseline and (on GPUs, when installed) liger-kernel and cut-cross-entropy.

Examples:
    python -m bench                      # the CPU preset (or the GPU preset on a CUDA machine)
    python -m bench --preset gpu-small   # a quick GPU run
    python -m bench --preset gpu-core    # the GPU check's core benchmark (bench/gpu_check.sh)
    python -m bench --preset gpu-core --rehearse   # its code path on the CPU at toy sizes, in seconds
    python -m bench --demo               # the quick CPU run behind `make demo`
    python -m bench train-step --help    # the training-step benchmark (bench/train_step.py)

Tables are rewritten after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from bench.cases import DTYPES, MODES, OPS, PEER_MODULES, PRESETS, REHEARSAL, Case, available, matmul_flops, min_bytes
from bench.measure import copy_bandwidth_gbps, measure_cpu, measure_gpu
from bench.report import add_derived, environment, write

RESULTS = Path(__file__).resolve().parent / "results"


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, d, v = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,D,V (three integers), got {text!r}") from None
    if min(n, d, v) < 1:
        raise argparse.ArgumentTypeError(f"N, D and V must be >= 1, got {text!r}")
    return n, d, v


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n"
        + "\n".join(
            f"  {k:10s} {p.description}: N,D,V={p.linear_shape}, rows,T={p.sequence_shape}"
            f", policy B,T={p.policy_shape}, {p.dtype}, {p.device}"
            for k, p in PRESETS.items()
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu with CUDA, else cpu")
    parser.add_argument("--demo", action="store_true", help="the quick CPU preset; prints, saves to results/tmp")
    parser.add_argument("--ops", nargs="+", choices=OPS, help="only these ops, in this order (default: the preset's)")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="only these modes (default: the preset's)")
    parser.add_argument("--impls", nargs="+", help="only these implementations (e.g. eager fastalign-torch)")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="run a GPU preset's cases on the CPU at toy shapes: the same implementations where they "
        "run there (Triton in its interpreter), the same in-process measurement with host timers; a dry run of the "
        "GPU code path (bench/gpu_check.sh)",
    )
    parser.add_argument("--repeats", type=int, help="timed steps per CPU case (default: the preset's)")
    parser.add_argument("--shape", type=_shape, help="N,D,V for the core ops instead of the preset's (logits: N,V)")
    parser.add_argument("--out", type=Path, help=f"output folder (default: {RESULTS})")
    args = parser.parse_args(argv)
    if args.demo:
        args.preset, args.out = "demo", args.out or RESULTS / "tmp"
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    args.out = args.out or RESULTS
    if args.rehearse:
        if PRESETS[args.preset].device != "cuda":
            parser.error(f"--rehearse rehearses a GPU preset on the CPU; {args.preset!r} is a CPU preset")
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--rehearse needs TRITON_INTERPRET=1 before triton is imported (set it in the environment)")
        os.environ["TRITON_INTERPRET"] = "1"  # fastalign's Triton kernels run in triton's CPU interpreter
    elif PRESETS[args.preset].device == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset!r} needs a CUDA device and torch sees none (--rehearse: on the CPU)")
    return args


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The preset's (op, mode) pairs, filtered by --ops (in its order) and --modes, times the implementations
    that run here (the preset's, or --impls)."""
    preset = PRESETS[args.preset]
    pairs = preset.default_cases()
    if args.ops:
        pairs = [(op, mode) for op in args.ops for pair_op, mode in pairs if pair_op == op]
    if args.modes:
        pairs = [(op, mode) for op, mode in pairs if mode in args.modes]
    device = "cpu" if args.rehearse else preset.device
    shapes = REHEARSAL if args.rehearse else preset
    wanted = args.impls or preset.impls
    cases = []
    for op, mode in pairs:
        n, d, v, t = shapes.shape(op)
        if args.shape and op in ("linear_logprobs", "linear_cross_entropy", "logprobs_from_logits"):
            n, d, v = args.shape[0], 0 if op == "logprobs_from_logits" else args.shape[1], args.shape[2]
        for impl in available(op, device, kernels=preset.device == "cuda"):
            if not wanted or impl in wanted:
                cases.append(Case(op, impl, mode, n, d, v, preset.dtype, device, t))
    return cases


def main(argv: list[str] | None = None) -> None:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["train-step"]:  # the training-step benchmark
        from bench.train_step import main as train_step_main

        train_step_main((sys.argv[1:] if argv is None else argv)[1:])
        return
    args = parse_args(sys.argv[1:] if argv is None else argv)
    preset = PRESETS[args.preset]
    repeats = args.repeats or preset.repeats
    cases = build_cases(args)
    if not cases:
        raise SystemExit(f"no cases: preset {args.preset!r} with --ops/--modes/--impls as given selects none")
    in_process = preset.device == "cuda"  # GPU presets, rehearsed or not: measured in this process
    device = cases[0].device
    env = environment(device)
    copy_gbps = None
    if device == "cuda":  # the bandwidth-bound ops are judged against a copy of a tensor their size
        logits = [c for c in cases if c.op == "logprobs_from_logits"]
        nbytes = logits[0].n * logits[0].v * DTYPES[logits[0].dtype].itemsize if logits else 2 << 30
        copy_gbps = copy_bandwidth_gbps(nbytes)
        env["dram_copy_gbps"] = f"{copy_gbps:.0f}"
        env["dram_copy_bytes"] = f"{nbytes}"
        print(f"device-to-device copy of {nbytes / 2**30:.2f} GiB: {copy_gbps:.0f} GB/s", file=sys.stderr)
    name = f"{args.preset}-rehearsal" if args.rehearse else args.preset
    title = preset.description if args.shape is None else f"{preset.description}, shapes overridden by --shape"
    if args.rehearse:
        title += ", rehearsed on the CPU at toy shapes (bench/cases.py REHEARSAL; the timings mean nothing)"
    command = ("python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    rows = []
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.op} {case.mode} {case.impl} ...", end=" ", file=sys.stderr, flush=True)
        result = measure_gpu(case, repeats or 2) if in_process else measure_cpu(case, repeats)
        print(
            result.get("error") or f"{result['time_ms']:.1f} ms, {result['peak_extra_mib']:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
        rows.append({**case.to_dict(), **result, "flops": matmul_flops(case), "bytes": min_bytes(case)})
        add_derived(rows, copy_gbps)
        path = write(rows, env, name, device, title, command, args.out)  # after every case: a cut run keeps it
    print(path.read_text())
    print(f"written: {path} and {path.with_suffix('.csv')}", file=sys.stderr)
    if args.rehearse:
        # A peer's Triton kernel that triton's interpreter cannot run (cut-cross-entropy's) got as far as its
        # kernel: the call itself is right. Every other error would recur on the GPU.
        errors = [
            f"{r['op']} {r['mode']} {r['impl']}: {r['error']}"
            for r in rows
            if r.get("error") and not (r["impl"] in PEER_MODULES and r["error"].startswith("InterpreterError"))
        ]
        if errors:
            raise SystemExit("rehearsal: cases that failed (they would fail on the GPU too):\n  " + "\n  ".join(errors))


if __name__ == "__main__":
    main()
