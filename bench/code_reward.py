"""Code-reward throughput: programs scored per second for GRPO-sized batches (issue 16).

``python -m bench.code_reward [--completions 64] [--tests 5] [--repeats 3] [--sandbox bwrap|unsandboxed]``
scores ``completions`` MBPP-like programs (half correct, a quarter wrong, a quarter raising) against ``tests``
assert statements each, ``repeats`` times, and prints the median and spread of programs per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fastalign.rewards import CodeReward

_PROGRAMS = (
    "```python\ndef solve(n):\n    return sum(i * i for i in range(n))\n```",
    "```python\ndef solve(n):\n    total = 0\n    for i in range(n):\n        total += i * i\n    return total\n```",
    "```python\ndef solve(n):\n    return n * n\n```",
    "```python\ndef solve(n):\n    raise ValueError(n)\n```",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=int, default=64, help="programs per batch (default 64)")
    parser.add_argument("--tests", type=int, default=5, help="assert statements per program (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="batches timed (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="programs in parallel (CodeReward's default)")
    parser.add_argument("--sandbox", default=None, help="CodeReward(sandbox=...) (default: CodeReward's default)")
    args = parser.parse_args(argv)
    options = {} if args.sandbox is None else {"sandbox": args.sandbox}
    reward = CodeReward(timeout=10, max_workers=args.workers, **options)
    tests = [f"assert solve({n}) == {sum(i * i for i in range(n))}" for n in range(3, 3 + args.tests)]
    completions = [_PROGRAMS[i % len(_PROGRAMS)] for i in range(args.completions)]
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rewards = reward(completions=completions, tests=[tests] * len(completions))
        rates.append(len(completions) / (time.perf_counter() - start))
    expected = [1.0, 1.0, 0.0, 0.0] * (len(completions) // 4) + [1.0, 1.0, 0.0][: len(completions) % 4]
    if rewards[: len(expected)] != expected:
        raise SystemExit(f"wrong rewards: {rewards}")
    print(
        f"{reward!r}: {args.completions} programs x {args.tests} tests: median {statistics.median(rates):.1f} "
        f"programs/s (min {min(rates):.1f}, max {max(rates):.1f}, {args.repeats} batches)"
    )


if __name__ == "__main__":
    main()
