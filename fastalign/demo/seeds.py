"""The demo over several seeds: each stage's numbers as mean and range, and the issue's targets checked.

    python -m fastalign.demo.seeds --output_dir runs/seeds --seeds 0 1 2

Each seed is a whole ``fastalign demo`` run (its own task split and training seed) in ``OUTPUT_DIR/seed<N>``
(finished stages are reused, as the demo does). It writes ``OUTPUT_DIR/seed_spread.json`` (the demo's plot draws
the range of held-out accuracy from the copy in ``fastalign/demo/seed_spread.json``) and the markdown table of
docs/rl.md to ``OUTPUT_DIR/seed_table.md``, and prints whether each target held on every seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MEASURES = ("heldout_accuracy", "sampled_accuracy", "pass_at_k", "short_style_rate", "reward_model_score")
"""The per-stage numbers aggregated over seeds."""

RL_GAIN_POINTS = 10.0
"""reasoning_rl's least gain in held-out accuracy over cold_start, in points, on every seed."""

FINAL_ACCURACY_LOSS_POINTS = 2.0
"""final_rl's largest loss of held-out accuracy against reasoning_sft, in points, on every seed."""


def spread(reports: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{measure: {stage: {"mean", "min", "max", "values"}}}`` over the reports' stages (a stage's measure only
    where every report has it)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    names = [stage["name"] for stage in reports[0]["stages"]]
    for measure in MEASURES:
        for name in names:
            values = [next((s.get(measure) for s in r["stages"] if s["name"] == name), None) for r in reports]
            if any(v is None for v in values):
                continue
            table.setdefault(measure, {})[name] = {
                "mean": statistics.fmean(values),
                "min": min(values),
                "max": max(values),
                "values": values,
            }
    return table


def targets(reports: Sequence[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """``(target, held on every seed, the per-seed numbers)`` for the demo's three targets."""

    def stage(report: dict[str, Any], name: str) -> dict[str, Any]:
        return next(s for s in report["stages"] if s["name"] == name)

    gains = [
        100 * (stage(r, "reasoning_rl")["heldout_accuracy"] - stage(r, "cold_start")["heldout_accuracy"])
        for r in reports
    ]
    score_gains = [
        stage(r, "final_rl")["reward_model_score"] - stage(r, "reasoning_sft")["reward_model_score"] for r in reports
    ]
    losses = [
        100 * (stage(r, "reasoning_sft")["heldout_accuracy"] - stage(r, "final_rl")["heldout_accuracy"])
        for r in reports
    ]
    seconds = [r["seconds"] for r in reports]
    return [
        (
            f"reasoning_rl >= +{RL_GAIN_POINTS:g} points over cold_start",
            all(g >= RL_GAIN_POINTS for g in gains),
            ", ".join(f"{g:+.1f}" for g in gains),
        ),
        (
            "final_rl raises the reward model's score over reasoning_sft",
            all(g > 0 for g in score_gains),
            ", ".join(f"{g:+.2f}" for g in score_gains),
        ),
        (
            f"final_rl loses <= {FINAL_ACCURACY_LOSS_POINTS:g} points of accuracy",
            all(loss <= FINAL_ACCURACY_LOSS_POINTS for loss in losses),
            "change " + ", ".join(f"{-loss:+.1f}" for loss in losses),
        ),
        ("the whole demo <= 600 s", all(s <= 600 for s in seconds), ", ".join(f"{s:.0f} s" for s in seconds)),
    ]


def _range(entry: dict[str, float] | None, digits: int) -> str:
    if entry is None:
        return "–"
    return f"{entry['mean']:.{digits}f} ({entry['min']:.{digits}f}–{entry['max']:.{digits}f})"


def markdown_table(reports: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
    """One row per stage: each measure's mean over the seeds with its range in brackets."""
    table = spread(reports)
    header = "| stage | greedy accuracy | sampled accuracy | pass@8 | short style | reward-model score |"
    lines = [f"Seeds {', '.join(map(str, seeds))}: mean (min–max).", "", header, "|---|---|---|---|---|---|"]
    for stage in reports[0]["stages"]:
        name = stage["name"]
        if name not in table.get("heldout_accuracy", {}) or stage.get("format_rate") is None:
            continue
        cells = [_range(table.get(m, {}).get(name), 2 if m == "reward_model_score" else 3) for m in MEASURES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastalign.demo.seeds",
        description="Runs `fastalign demo` once per seed and reports each stage's numbers as mean and range, and "
        "whether the demo's targets held on every seed.",
    )
    parser.add_argument("--output_dir", required=True, help="one folder per seed goes in here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    options = parser.parse_args(argv)
    from fastalign.demo.run import run_demo

    root = Path(options.output_dir)
    reports = []
    for seed in options.seeds:
        print(f"== seed {seed}", file=sys.stderr, flush=True)
        reports.append(run_demo(root / f"seed{seed}", seed=seed))
    root.mkdir(parents=True, exist_ok=True)
    (root / "seed_spread.json").write_text(
        json.dumps({"seeds": options.seeds, **spread(reports), "targets": targets(reports)}, indent=2) + "\n"
    )
    (root / "seed_table.md").write_text(markdown_table(reports, options.seeds))
    print(markdown_table(reports, options.seeds))
    held = True
    for target, ok, numbers in targets(reports):
        print(f"{'held' if ok else 'MISSED'}: {target} ({numbers})")
        held = held and ok
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
