"""``python -m bench``: time forward and forward+backward, and peak memory, of fastalign's core ops against the
eager baseline and (on GPUs, when installed) liger-kernel and cut-cross-entropy.

Examples:
    python -m bench                      # the CPU preset (or the GPU preset on a CUDA machine)
    python -m bench --preset gpu-small   # a quick GPU run
    python -m bench --demo               # the quick CPU run behind `make demo`
    python -m bench train-step --help    # the training-step benchmark (bench/train_step.py)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from bench.cases import MODES, OPS, PRESETS, TRAINING_ONLY, Case, implementations, matmul_flops, min_bytes
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
        epilog="presets:\n" + "\n".join(f"  {k:10s} {p.description}: N,D,V={p.linear_shape}, rows,T={p.sequence_shape}"
                                          f", policy B,T={p.policy_shape}, {p.dtype}, {p.device}"
                                          for k, p in PRESETS.items()),
    )  # fmt: skip
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu with CUDA, else cpu")
    parser.add_argument("--demo", action="store_true", help="the quick CPU preset; prints, saves to results/tmp")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--impls", nargs="+", help="only these implementations (e.g. eager fastalign-torch)")
    parser.add_argument("--repeats", type=int, help="timed steps per CPU case (default: the preset's)")
    parser.add_argument("--shape", type=_shape, help="N,D,V for the core ops instead of the preset's (logits: N,V)")
    parser.add_argument("--out", type=Path, help=f"output folder (default: {RESULTS})")
    args = parser.parse_args(argv)
    if args.demo:
        args.preset, args.out = "demo", args.out or RESULTS / "tmp"
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    args.out = args.out or RESULTS
    if PRESETS[args.preset].device == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset!r} needs a CUDA device and torch sees none")
    return args


def build_cases(args: argparse.Namespace) -> list[Case]:
    preset = PRESETS[args.preset]
    cases = []
    for op in args.ops:
        n, d, v, t = preset.shape(op)
        if args.shape and op in ("linear_logprobs", "linear_cross_entropy", "logprobs_from_logits"):
            n, d, v = args.shape[0], 0 if op == "logprobs_from_logits" else args.shape[1], args.shape[2]
        for mode in args.modes:
            if mode == "fwd" and op in TRAINING_ONLY:
                continue
            for impl in implementations(op, preset.device):
                if args.impls and impl not in args.impls:
                    continue
                cases.append(Case(op, impl, mode, n, d, v, preset.dtype, preset.device, t))
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
    rows = []
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.op} {case.mode} {case.impl} ...", end=" ", file=sys.stderr, flush=True)
        result = measure_gpu(case) if preset.device == "cuda" else measure_cpu(case, repeats)
        print(result.get("error") or f"{result['time_ms']:.1f} ms, {result['peak_extra_mib']:.0f} MiB",
              file=sys.stderr)  # fmt: skip
        rows.append({**case.to_dict(), **result, "flops": matmul_flops(case), "bytes": min_bytes(case)})
    add_derived(rows)
    env = environment(preset.device)
    if preset.device == "cuda":
        env["dram_copy_gbps"] = f"{copy_bandwidth_gbps():.0f}"
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    title = preset.description if args.shape is None else f"{preset.description}, shapes overridden by --shape"
    path = write(rows, env, args.preset, preset.device, title, command.strip(), args.out)
    print(path.read_text())
    print(f"written: {path} and {path.with_suffix('.csv')}", file=sys.stderr)


if __name__ == "__main__":
    main()
