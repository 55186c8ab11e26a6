"""Tables of benchmark results (CSV and markdown), the environment they were measured in, and the targets."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cases import FLOOR_IMPL

COLUMNS = [
    *("op", "mode", "impl", "dtype", "n", "d", "v"),  # the case
    *("time_ms", "time_p10_ms", "time_p90_ms", "vs_eager", "vs_matmuls"),  # time
    *("peak_extra_mib", "mem_vs_eager"),  # memory
    *("tflops", "gbps", "vs_copy", "out_rel_err", "error"),  # work done, and the output against eager's
]


def package_version(package: str) -> str:
    """The installed version of ``package``, or ``not installed``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: str) -> dict[str, str]:
    """The header lines of a results file: the device, the date, the versions of the packages benchmarked."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device_name = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device_name = f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    return {
        "device": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "fastalign": package_version("fastalign"),
        "trl": package_version("trl"),
        "liger-kernel": package_version("liger-kernel"),
        "cut-cross-entropy": package_version("cut-cross-entropy"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_slug(env: dict[str, str]) -> str:
    """A file-name-safe tag of the device, e.g. ``nvidia-h100-80gb-hbm3``."""
    name = env["device"].split(" (")[0].lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def relative_to(
    rows: list[dict], base_impl: str, key: Callable[[dict], object], time: str, speed: str, memory: str | None = None
) -> None:
    """Set ``row[speed]`` = the ``base_impl`` row's ``time`` / this row's and ``row[memory]`` = this row's
    ``peak_extra_mib`` / the base row's, on every timed row with a timed base row of the same ``key(row)``."""
    bases = {key(r): r for r in rows if r["impl"] == base_impl and time in r}
    for row in rows:
        base = bases.get(key(row))
        if base is None or time not in row:
            continue
        row[speed] = base[time] / row[time]
        if memory is not None:
            row[memory] = row["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9)


def add_derived(rows: list[dict], copy_gbps: float | None = None) -> None:
    """Speed-up and memory relative to eager on the same op and mode, achieved TFLOP/s or GB/s, and the share of
    the floors: the bare lm_head matmuls' time over this time (``vs_matmuls``, where measured) and this GB/s over
    the measured device-to-device copy rate (``vs_copy``, where given)."""

    def op_and_mode(row: dict) -> tuple[str, str]:
        return row["op"], row["mode"]

    relative_to(rows, "eager", op_and_mode, "time_ms", "vs_eager", "mem_vs_eager")
    relative_to(rows, FLOOR_IMPL, op_and_mode, "time_ms", "vs_matmuls")
    for row in rows:
        if "time_ms" not in row:
            continue
        seconds = row["time_ms"] / 1e3
        if row["flops"]:
            row["tflops"] = row["flops"] / seconds / 1e12
        if row["bytes"]:
            row["gbps"] = row["bytes"] / seconds / 1e9
            if copy_gbps:
                row["vs_copy"] = row["gbps"] / copy_gbps


# How a float reads in a table, by column (the columns of both benchmarks).
SPEEDUPS = ("vs_eager", "vs_trl")  # that row's time / this time: 2.00x
MEMORY_SHARES = ("mem_vs_eager", "mem_vs_trl")  # this peak / that row's: 12.5%
FLOOR_SHARES = ("vs_matmuls", "vs_copy")  # this row's share of a floor: 80%
PRECISE = ("loss",)  # 5 significant digits, where the implementations agree


def format_value(value: object, column: str) -> str:
    """One table cell: ``value`` of ``column``; empty when missing, 3 significant digits unless the column says."""
    if value is None or value == "":
        return ""
    if not isinstance(value, float):
        return str(value)
    if column in SPEEDUPS:
        return f"{value:.2f}x"
    if column in MEMORY_SHARES:
        return f"{100 * value:.1f}%"
    if column in FLOOR_SHARES:
        return f"{100 * value:.0f}%"
    if column in PRECISE:
        return f"{value:.5g}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def markdown_table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    """The ``columns`` that any of ``rows`` has a value in, in that order, as a markdown table."""
    shown = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(format_value(row.get(c), c) for c in shown) + " |" for row in rows]
    return "\n".join(lines)


def header(title: str, env: dict[str, str], command: str) -> list[str]:
    """The top of a results file: ``# title``, the environment as a list, the command that wrote the file."""
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    return [*lines, f"- command: `{command}`", ""]


def checklist(targets: list[tuple[bool | None, str]]) -> list[str]:
    """``(met, text)`` targets as markdown: ``[x]`` met, ``[ ]`` missed, ``[-]`` not judged (``met`` None)."""
    return [f"- [{'-' if met is None else 'x' if met else ' '}] {text}" for met, text in targets]


def write_tables(
    rows: list[dict], columns: list[str], markdown: str, stem: str, env: dict[str, str], device: str, out_dir: Path
) -> Path:
    """Write ``<stem>[-<gpu>].csv`` (``columns`` of ``rows``) and ``<stem>[-<gpu>].md`` (``markdown``) into
    ``out_dir``; return the markdown path. On CUDA the device's slug ends the name: GPUs' tables sit side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem += f"-{device_slug(env)}" if device == "cuda" else ""
    with open(out_dir / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    path = out_dir / f"{stem}.md"
    path.write_text(markdown)
    return path


def check_targets(rows: list[dict], preset_name: str, copy_gbps: float | None = None) -> list[tuple[bool, str]]:
    """The issue's targets, as ``(met, description with the numbers)``.

    ``copy_gbps``: the measured DRAM bandwidth (device-to-device copy) the bandwidth-bound kernels are held to.
    """
    index = {(r["op"], r["mode"], r["impl"]): r for r in rows if "vs_eager" in r}
    results = []
    if preset_name == "cpu":
        for op, limit in (("linear_logprobs", 1.5), ("linear_cross_entropy", 1.15)):
            row = index.get((op, "fwd+bwd", "fastalign-torch"))
            text = f"{op} fwd+bwd time <= {limit}x eager's"
            results.append((row is not None and 1 / row["vs_eager"] <= limit, _detail(text, row, "time")))
            for mode in ("fwd", "fwd+bwd"):
                row = index.get((op, mode, "fastalign-torch"))
                text = f"{op} {mode} extra peak memory <= 10% of eager's"
                results.append((row is not None and row["mem_vs_eager"] <= 0.10, _detail(text, row, "memory")))
        for op in ("linear_dpo", "linear_grpo"):
            row = index.get((op, "fwd+bwd", "fastalign-torch"))
            text = f"{op} (fused-linear module) fwd+bwd extra peak memory <= 10% of eager's"
            results.append((row is not None and row["mem_vs_eager"] <= 0.10, _detail(text, row, "memory")))
        return results
    for op in ("linear_dpo", "linear_grpo"):
        ours, theirs = index.get((op, "fwd+bwd", "fastalign-triton")), index.get((op, "fwd+bwd", "liger-kernel"))
        if ours is None or theirs is None:
            results.append((False, f"{op} fwd+bwd vs liger-kernel: not measured"))
        else:
            speed, memory = (
                theirs["time_ms"] / ours["time_ms"],
                ours["peak_extra_mib"] / max(theirs["peak_extra_mib"], 1e-9),
            )
            results.append((speed >= 1.3, f"{op} fwd+bwd >= 1.3x faster than liger-kernel: {speed:.2f}x"))
            results.append(
                (memory <= 0.5, f"{op} fwd+bwd extra peak memory <= 50% of liger-kernel's: {100 * memory:.0f}%")
            )
    results += _cuda_targets(index, copy_gbps)
    row = index.get(("policy_loss", "fwd+bwd", "fastalign-triton"))
    results.append(
        (
            row is not None and row["vs_eager"] >= 5,
            _detail("policy_loss kernel fwd+bwd >= 5x faster than eager", row, "speed"),
        )
    )
    for op in ("linear_logprobs", "linear_cross_entropy"):
        ours = index.get((op, "fwd+bwd", "fastalign-triton"))
        text = f"{op} fwd+bwd >= 1.5x faster than eager"
        results.append((ours is not None and ours["vs_eager"] >= 1.5, _detail(text, ours, "speed")))
        text = f"{op} fwd+bwd extra peak memory <= 2% of eager's"
        results.append((ours is not None and ours["mem_vs_eager"] <= 0.02, _detail(text, ours, "memory")))
        for peer in ("liger-kernel", "cut-cross-entropy"):
            theirs = index.get((op, "fwd+bwd", peer))
            text = f"{op} fwd+bwd faster than {peer}"
            if ours is None or theirs is None:
                results.append((False, f"{text}: not measured"))
            else:
                ratio = theirs["time_ms"] / ours["time_ms"]
                results.append((ratio > 1, f"{text}: {ratio:.2f}x"))
    return results


def _cuda_targets(index: dict, copy_gbps: float | None) -> list[tuple[bool, str]]:
    """Issue 4: the CUDA kernels reach 80% of DRAM bandwidth; logprobs_from_logits fwd+bwd >= 3x eager."""
    results = []
    row = index.get(("logprobs_from_logits", "fwd+bwd", "fastalign-cuda"))
    text = "logprobs_from_logits cuda fwd+bwd >= 3x faster than eager"
    results.append((row is not None and row["vs_eager"] >= 3, _detail(text, row, "bandwidth")))
    for op, mode in (
        ("logprobs_from_logits", "fwd"),
        ("logprobs_from_logits", "fwd+bwd"),
        ("policy_loss", "fwd+bwd"),
        ("dpo_loss", "fwd+bwd"),
    ):
        row = index.get((op, mode, "fastalign-cuda"))
        text = f"{op} cuda {mode} >= 80% of DRAM bandwidth"
        if row is None or not copy_gbps:
            results.append((False, f"{text}: not measured"))
        else:
            share = row["gbps"] / copy_gbps
            results.append((share >= 0.8, f"{text}: {row['gbps']:.0f} of {copy_gbps:.0f} GB/s = {100 * share:.0f}%"))
    return results


# The dispatch key (fastalign.ops.dispatch.AUTO_ON_CUDA) each benchmarked op informs.
DISPATCH_KEYS = {
    "linear_logprobs": "linear_stats",
    "logprobs_from_logits": "logits_stats",
    "policy_loss": "policy_loss",
    "dpo_loss": "dpo_loss",
}


def fastest_backends(rows: list[dict]) -> dict[str, tuple[str, str]]:
    """``{dispatch key: (backend, evidence)}``: the fastest fastalign backend on each op's fwd+bwd step."""
    choice = {}
    for op, key in DISPATCH_KEYS.items():
        timed = [
            r
            for r in rows
            if r["op"] == op and r["mode"] == "fwd+bwd" and r["impl"].startswith("fastalign-") and r.get("time_ms")
        ]
        if timed:
            best = min(timed, key=lambda r: r["time_ms"])
            evidence = ", ".join(f"{r['impl'].removeprefix('fastalign-')} {r['time_ms']:.3g} ms" for r in timed)
            choice[key] = (best["impl"].removeprefix("fastalign-"), f"{op} fwd+bwd: {evidence}")
    return choice


def _detail(text: str, row: dict | None, kind: str) -> str:
    if row is None:
        return f"{text}: not measured"
    if kind == "time":
        return f"{text}: {1 / row['vs_eager']:.2f}x"
    if kind == "speed":
        return f"{text}: {row['vs_eager']:.2f}x, {row.get('tflops', 0):.0f} TFLOP/s"
    if kind == "bandwidth":
        return f"{text}: {row['vs_eager']:.2f}x, {row.get('gbps', 0):.0f} GB/s"
    return f"{text}: {100 * row['mem_vs_eager']:.1f}%"


def write(
    rows: list[dict], env: dict[str, str], preset_name: str, device: str, preset_text: str, command: str, out_dir: Path
) -> Path:
    """Write ``core_ops-<preset>[-<gpu>].{csv,md}`` and return the markdown path."""
    markdown = render(rows, env, preset_name, preset_text, command)
    return write_tables(rows, COLUMNS, markdown, f"core_ops-{preset_name}", env, device, out_dir)


def render(rows: list[dict], env: dict[str, str], preset_name: str, preset_text: str, command: str) -> str:
    lines = header(f"fastalign core-op benchmark: `{preset_name}` ({preset_text})", env, command)
    lines += [
        "time: median per step (time_p10_ms / time_p90_ms: the 10th and 90th percentiles of the repeats); fwd",
        "runs under no_grad (reference / old-policy log-probs), fwd+bwd is a training step. peak_extra_mib: peak",
        "memory during one step above the inputs and the inputs' gradients (which every implementation must",
        "produce). vs_eager: eager time / this time. tflops counts the matmul work (2·N·D·V fwd, 6·N·D·V",
        "fwd+bwd); gbps counts the least traffic of the bandwidth-bound ops (logprobs_from_logits: read the",
        "logits once; + read and write d_logits once; bench/cases.py min_bytes).",
        f"{FLOOR_IMPL}: the floor of the lm_head ops, their matmuls alone at the same shapes (forward hidden @ W.T;",
        "backward the two gradient GEMMs); vs_matmuls: its time / this time. trl-chunked: TRL's",
        "trl.kernels.ChunkedLogProbFunction (log-probs only, TRL's chunk of 32768). vs_copy: gbps / the",
        "device-to-device copy rate (dram_copy_gbps). out_rel_err: max |out - eager| / max |eager| of the",
        "forward on the case's inputs (GPU presets; checked before timing).",
        "",
    ]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"## {op}", "", markdown_table([r for r in rows if r["op"] == op]), ""]
    if any(r["device"] == "cuda" for r in rows):
        lines += [
            "## fastest backend per op",
            "",
            "What `fastalign.ops.dispatch.AUTO_ON_CUDA` should say, from this run:",
            "",
        ]
        lines += [f"- `{key}`: `{backend}` ({evidence})" for key, (backend, evidence) in fastest_backends(rows).items()]
        lines += [""]
    lines += ["## targets", ""]
    if "--shape" in command:
        lines += ["The targets are set for the preset's shapes; this run overrode them with --shape."]
    elif preset_name not in ("cpu", "gpu", "gpu-core"):
        lines += [f"The targets are set for the `cpu` and `gpu` presets' shapes; `{preset_name}` is informational."]
    else:
        copy_gbps = float(env["dram_copy_gbps"]) if "dram_copy_gbps" in env else None
        targets = check_targets(rows, "cpu" if preset_name == "cpu" else "gpu", copy_gbps)
        if preset_name == "gpu-core":  # the gpu preset's shapes for a subset of its ops: the targets of those
            measured = {r["op"] for r in rows}
            targets = [(met, text) for met, text in targets if text.split()[0] in measured]
        lines += checklist(targets)
    return "\n".join(lines) + "\n"
