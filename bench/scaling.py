"""``python -m bench.scaling``: vocabulary-parallel ``linear_logprobs`` forward+backward on CPU across gloo world
sizes — time per step, peak extra memory per process, bytes communicated per step, and the difference from world
size 1.

Every world size runs in freshly spawned processes (one gloo rank each, ``--threads`` torch threads each). Rank
``r`` holds an even share of the vocabulary rows; ``hidden`` and ``targets`` are the same everywhere, and every
world size, 1 included, runs the vocab-parallel path (a group of one is bit-identical to no group, see
tests/ops/test_vocab_parallel.py). The weight is generated in fixed blocks of rows, so every rank builds exactly the
rows of the full weight it holds. The step is ``linear_logprobs(...).sum().backward()`` with gradients for
``hidden`` and the weight shard.

Measured per rank, reported for the slowest rank (the step ends for all with the last collective):

* peak extra memory: peak RSS during the first full-size step (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``; a tiny step ran before it to page in the code and open the connections, and
  ``malloc_trim`` returned the allocator's free pages) minus the RSS before it minus the gradients' bytes —
  memory of the whole process, not only torch's, page-granular;
* time: median of the ``--repeats`` steps after that one, each started after a barrier;
* communication: every ``torch.distributed.all_gather`` / ``all_reduce`` issued during a step is intercepted and
  its tensor size recorded (the payload each rank contributes); the bytes each rank sends are estimated for ring
  algorithms, ``(R−1)·payload`` for an all-gather and ``2(R−1)/R·payload`` for an all-reduce (gloo chooses its
  own algorithms, so this is an estimate, unlike the payload);
* accuracy: max abs difference of ``logp``, ``d_hidden`` and the ``d_weight`` shard from the world-size-1 run.

Examples:
    python -m bench.scaling --world_sizes 1 2 3 --tokens 1024 --hidden 896 --vocab 151936 \\
        --output bench/results/scaling-cpu.md
    python -m bench.scaling --world_sizes 1 2 --tokens 64 --hidden 32 --vocab 1000   # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastalign
from bench.measure import peak_rss, rss_baseline
from bench.report import environment

WEIGHT_BLOCK_ROWS = 8192
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaling",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2, 3], help="gloo world sizes to run")
    parser.add_argument("--tokens", type=int, default=1024, help="N, tokens per step")
    parser.add_argument("--hidden", type=int, default=896, help="D, hidden width (Qwen2.5-0.5B: 896)")
    parser.add_argument("--vocab", type=int, default=151936, help="V, full vocabulary (Qwen2.5: 151936)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per world size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--output", type=Path, help="write the markdown table here (it is always printed)")
    parser.add_argument("--note", help="a remark printed under the header (e.g. how busy the machine was)")
    args = parser.parse_args(argv)
    if min(args.world_sizes) < 1 or min(args.tokens, args.hidden, args.vocab, args.repeats, args.threads) < 1:
        parser.error("world sizes, --tokens, --hidden, --vocab, --repeats and --threads must be >= 1")
    if max(args.world_sizes) > args.vocab:
        parser.error(f"every rank needs at least one vocabulary row: world size {max(args.world_sizes)} > --vocab")
    return args


def shard_bounds(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """``(vocab_start, V_local)`` of ``rank``: sizes as even as possible, in rank order."""
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    return sum(sizes[:rank]), sizes[rank]


def weight_rows(start: int, stop: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[start, stop)`` of the full weight, the same whichever rank builds them (lm_head-like scale)."""
    blocks = []
    for block in range(start // WEIGHT_BLOCK_ROWS, (stop - 1) // WEIGHT_BLOCK_ROWS + 1):
        gen = torch.Generator().manual_seed(1000 + block)
        first = block * WEIGHT_BLOCK_ROWS
        rows = torch.randn(WEIGHT_BLOCK_ROWS, width, generator=gen) * 0.05
        blocks.append(rows[max(start, first) - first : min(stop, first + WEIGHT_BLOCK_ROWS) - first])
    return torch.cat(blocks).to(dtype)


def shared_inputs(tokens: int, width: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(tokens, width, generator=gen).to(dtype), torch.randint(0, vocab, (tokens,), generator=gen)


class CollectiveLog:
    """Records ``(collective, payload bytes)`` of every all_gather / all_reduce issued while installed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}

    def _wrap(self, name: str):
        original = self._originals[name]

        def counted(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]  # all_gather(outputs, input), all_reduce(tensor)
            self.calls.append((name, tensor.numel() * tensor.element_size()))
            return original(*args, **kwargs)

        return counted

    def __enter__(self) -> CollectiveLog:
        self.calls = []
        for name in self._originals:
            setattr(dist, name, self._wrap(name))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def ring_bytes_sent(calls: list[tuple[str, int]], world: int) -> float:
    """Bytes one rank sends for these collectives under ring algorithms."""
    factor = {"all_gather": world - 1, "all_reduce": 2 * (world - 1) / world}
    return sum(factor[name] * size for name, size in calls)


def _rank_main(rank: int, world: int, port: int, config: dict, work_dir: str) -> None:
    torch.set_num_threads(config["threads"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=20),
    )
    try:
        _measure_rank(rank, world, config, Path(work_dir))
    finally:
        dist.destroy_process_group()


def _measure_rank(rank: int, world: int, config: dict, work_dir: Path) -> None:
    dtype = DTYPES[config["dtype"]]
    hidden, targets = shared_inputs(config["tokens"], config["hidden"], config["vocab"], dtype)
    start, rows = shard_bounds(config["vocab"], world, rank)
    hidden.requires_grad_()
    weight = weight_rows(start, start + rows, config["hidden"], dtype).requires_grad_()
    group = dist.group.WORLD

    def step() -> tuple[torch.Tensor, float]:
        hidden.grad, weight.grad = None, None
        dist.barrier(group)
        begin = time.perf_counter()
        logp = fastalign.linear_logprobs(
            hidden, weight, targets, backend="torch", process_group=group, vocab_start=start
        )
        logp.sum().backward()
        return logp.detach(), time.perf_counter() - begin

    # A tiny problem pages in the code and opens gloo's connections; a full-size warm-up would leave its scratch
    # in the allocator and hide it from the measured step.
    tiny_hidden = hidden[:4, :8].detach().clone().requires_grad_()
    tiny_weight = weight[:8, :8].detach().clone().requires_grad_()
    fastalign.linear_logprobs(
        tiny_hidden, tiny_weight, targets[:4] % (8 * world), backend="torch", process_group=group, vocab_start=8 * rank
    ).sum().backward()
    grad_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight))
    before = rss_baseline()  # the free pages building the inputs left resident handed back first
    with CollectiveLog() as log:
        logp, _ = step()
    peak_extra = max(0, peak_rss() - before - grad_bytes)
    times = [step()[1] for _ in range(config["repeats"])]
    result = {
        "rank": rank,
        "v_local": rows,
        "time_ms": 1e3 * statistics.median(times),
        "peak_extra_mib": peak_extra / 2**20,
        "calls": log.calls,
    }
    reference = work_dir / "world1.pt"
    if world == 1:
        torch.save({"logp": logp, "d_hidden": hidden.grad, "d_weight": weight.grad}, reference)
    elif reference.exists():
        full = torch.load(reference, mmap=True)
        result["max_diff"] = {
            "logp": (logp - full["logp"]).abs().max().item(),
            "d_hidden": (hidden.grad - full["d_hidden"]).abs().max().item(),
            "d_weight": (weight.grad - full["d_weight"][start : start + rows]).abs().max().item(),
        }
    (work_dir / f"world{world}-rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, config: dict, work_dir: Path) -> dict:
    """Spawn ``world`` ranks, measure, and merge their results into one row."""
    mp.spawn(_rank_main, args=(world, _free_port(), config, str(work_dir)), nprocs=world, join=True)
    ranks = [json.loads((work_dir / f"world{world}-rank{r}.json").read_text()) for r in range(world)]
    calls = ranks[0]["calls"]
    row = {
        "world_size": world,
        "v_local": max(r["v_local"] for r in ranks),
        "time_ms": max(r["time_ms"] for r in ranks),
        "peak_extra_mib": max(r["peak_extra_mib"] for r in ranks),
        "calls": calls,
        "payload_bytes": sum(size for _, size in calls),
        "ring_bytes_sent": ring_bytes_sent(calls, world),
    }
    if world == 1:
        row["max_diff"] = {"logp": 0.0, "d_hidden": 0.0, "d_weight": 0.0}
    elif "max_diff" in ranks[0]:
        row["max_diff"] = {key: max(r["max_diff"][key] for r in ranks) for key in ranks[0]["max_diff"]}
    return row


def _format_calls(calls: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} {size:,} B" for name, size in calls)


def _without_note(argv: list[str]) -> list[str]:
    """The command line minus ``--note`` (printed on a line of its own)."""
    shown, index = [], 0
    while index < len(argv):
        if argv[index] == "--note":
            index += 2
            continue
        if not argv[index].startswith("--note="):
            shown.append(argv[index])
        index += 1
    return shown


def markdown(rows: list[dict], config: dict, argv: list[str], load: float, note: str | None) -> str:
    env = environment("cpu")
    base = next((r["time_ms"] for r in rows if r["world_size"] == 1), None)
    lines = [
        "# Vocabulary-parallel linear_logprobs on CPU (gloo): scaling and communication",
        "",
        f"- device: {env['device'].split(' (')[0]}, {os.cpu_count()} cores, {config['threads']} torch thread(s) per "
        f"process; load average when the run started: {load:.1f}",
        f"- date: {env['date']}",
        f"- python: {env['python']}, torch: {env['torch']}, fastalign: {env['fastalign']}",
        f"- shape: N={config['tokens']} tokens, D={config['hidden']}, V={config['vocab']} (sharded), "
        f"{config['dtype']}, backend=torch",
        f"- command: `python -m bench.scaling {shlex.join(_without_note(argv))}`",
        "",
        "Step: `linear_logprobs(hidden, weight_shard, targets, process_group=..., vocab_start=...).sum().backward()`.",
        "time_ms: median of the timed steps on the slowest rank. peak_extra_mib: largest over the ranks of the peak",
        "RSS during the first full-size step minus the RSS before it and minus the gradients (whole-process memory,",
        "page-granular; it includes gloo's buffers).",
        "payload: bytes each rank passes to the collectives in one step (counted from the calls issued);",
        "ring_sent: estimated bytes each rank sends under ring algorithms. max abs Δ: largest difference from world",
        "size 1 over the ranks (d_weight: each rank's shard against the same rows of the world-1 gradient).",
        "",
        "| world | V_local | time_ms | vs world 1 | peak_extra_mib | payload B/rank | ring_sent B/rank "
        "| max abs Δ logp | max abs Δ d_hidden | max abs Δ d_weight |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if note:
        lines[8:8] = [f"Note: {note}", ""]
    for row in rows:
        diff = row.get("max_diff")
        diffs = [f"{diff[k]:.2e}" for k in ("logp", "d_hidden", "d_weight")] if diff else ["—"] * 3
        speed = f"{base / row['time_ms']:.2f}x" if base else "—"
        lines.append(
            f"| {row['world_size']} | {row['v_local']} | {row['time_ms']:.1f} | {speed} | {row['peak_extra_mib']:.1f} "
            f"| {row['payload_bytes']:,} | {row['ring_bytes_sent']:,.0f} | {' | '.join(diffs)} |"
        )
    lines += ["", "Collectives per step (payload per rank):", ""]
    lines += [f"- world {row['world_size']}: {_format_calls(row['calls'])}" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = {key: getattr(args, key) for key in ("tokens", "hidden", "vocab", "dtype", "repeats", "threads")}
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastalign-scaling-") as work_dir:
        # World size 1 first: the others compare against its outputs.
        for world in sorted(set(args.world_sizes)):
            rows.append(run_world(world, config, Path(work_dir)))
            print(f"world {world}: {rows[-1]['time_ms']:.1f} ms/step", flush=True)
    text = markdown(rows, config, argv, load, args.note)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return rows


if __name__ == "__main__":
    main()
