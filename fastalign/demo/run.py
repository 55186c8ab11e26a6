"""``fastalign demo``: DeepSeek-R1's recipe end to end on CPU, from nothing, in a few minutes.

The demo writes the synthetic addition task (:mod:`fastalign.demo.task`), builds its tokenizer and a tiny Llama
config, and runs the built-in ``r1`` recipe with one stage in front of it:

    pretrain -> cold_start (SFT) -> reasoning_rl (GRPO, rule rewards) -> rejection (sampling) -> reasoning_sft
    -> rm (reward model) -> final_rl (GRPO, reward model + rules) -> distill (a smaller student from final_rl)

through :func:`fastalign.pipeline.run_pipeline`, with the recipe's stages scaled down to the tiny model
(:data:`STAGE_ARGS`). After each stage it evaluates the result on held-out problems that no stage trained on:
greedy answers of a policy (accuracy, format rate, the recipe's rule reward), or the reward model's pairwise
accuracy (the distilled student's row also names its teacher's accuracy and both models' sizes); training
speed comes from each trainer's own log (``trainer_state.json``). It prints one table row per
stage, writes ``OUTPUT_DIR/report.json`` and a plot ``OUTPUT_DIR/report.png``.

    fastalign demo --output_dir runs/demo          # or: make demo
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastalign.demo.task import TaskSizes, build_tokenizer, write_task
from fastalign.pipeline import Stage, load_recipe, plan, run_pipeline

REPORT_FIELDS = (
    "heldout_accuracy",
    "format_rate",
    "mean_reward",
    "sampled_accuracy",
    "pass_at_k",
    "short_style_rate",
    "reward_model_score",
    "tokens_per_second",
    "train_seconds",
)
"""The numbers of each stage's row in ``report.json`` (``None`` where a stage has no such number)."""

MAX_COMPLETION_TOKENS = 64
"""Generation budget of every stage and of the evaluation (a worked answer takes 48-50 tokens)."""

PASS_K = 8
"""Completions sampled per held-out problem (at the GRPO stages' temperature) for sampled accuracy and pass@k."""

SAMPLING_SEED = 0

# The two GRPO stages' common settings (the final one adds its reward weights and KL).
_GRPO_ARGS = {
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "max_completion_length": MAX_COMPLETION_TOKENS,
    "max_prompt_length": 16,
    "learning_rate": 1.0e-4,
    "max_steps": 150,
    "logging_steps": 10,
    "temperature": 0.5,
}

# The recipe's stages, scaled to a ~1M-parameter model on 2 CPU cores. Everything not set here is the recipe's.
STAGE_ARGS: dict[str, dict[str, Any]] = {
    # One problem per row, unpacked: every row then starts at the same place, and in a calibration run the model
    # had learned where a column's digits are after 1 000 steps (96 of 100 two-digit sums); packed into 256-token
    # rows it had not (0 of 100).
    "pretrain": {
        "packing": False,
        "max_length": MAX_COMPLETION_TOKENS,
        "per_device_train_batch_size": 32,
        "learning_rate": 3.0e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "max_steps": 1500,
        "logging_steps": 100,
    },
    # Short on purpose: 200 worked solutions for 5 epochs move most answers to R1's format, not all (on seed 0's
    # split 3 epochs gave 0.32 held-out accuracy, 4 gave 0.69, 5 gave 0.86, one run each): RL finds the rest.
    "cold_start": {
        "per_device_train_batch_size": 16,
        "learning_rate": 1.0e-3,
        "num_train_epochs": 5,
        "logging_steps": 10,
    },
    "reasoning_rl": {**_GRPO_ARGS},
    "rejection": {
        "num_generations": 4,
        "max_completion_length": MAX_COMPLETION_TOKENS,
        "batch_size": 64,
        "max_prompt_length": 16,
    },
    "reasoning_sft": {
        "per_device_train_batch_size": 16,
        "learning_rate": 1.0e-3,
        "num_train_epochs": 3,
        "logging_steps": 10,
    },
    "rm": {"per_device_train_batch_size": 16, "learning_rate": 1.0e-3, "num_train_epochs": 2, "logging_steps": 10},
    "final_rl": {
        **_GRPO_ARGS,
        # A tiny reward model is a weak judge. At the recipe's weight 0.5 the policy learned to please it with wrong
        # answers (held-out accuracy 0.85 -> 0.00 in one run), and even at weight 0.1 when rewards were scaled by
        # the group's std: in a group where every answer is wrong only the reward model's score varies, and the
        # scaling blows it up. Unscaled rewards (Dr. GRPO), a small weight and a stronger KL keep it a tie-breaker.
        "reward_weights": [0.2, 1.0, 0.5],
        "beta": 0.02,
        "scale_rewards": "none",
    },
    # The student (STUDENT_SHAPE) starts from scratch: it learns from final_rl's full next-token distributions on
    # the rejection-sampled solutions and, in a quarter of the steps, on its own samples.
    "distill": {
        "per_device_train_batch_size": 32,
        "learning_rate": 3.0e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "max_steps": 400,
        "logging_steps": 20,
        "lmbda": 0.25,
        "max_completion_length": MAX_COMPLETION_TOKENS,
        "max_prompt_length": 16,
    },
}

DEFAULTS = {"disable_tqdm": True, "seed": 0}

SMOKE_SIZES = TaskSizes(
    heldout=16, cot=16, prompts=16, preferences=16, pretrain_worked=64, general=8, heldout_general=8
)
"""``--smoke``: a few rows per file (the pipeline's --smoke settings do the rest: 2 steps per stage)."""


@dataclass(frozen=True)
class ModelShape:
    """The demo model: a tiny Llama with tied embeddings (Llama, because transformers trusts a custom
    tokenizer saved next to a Llama config; it replaces the tokenizer of some model types, Qwen2 among them)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384


STUDENT_SHAPE = ModelShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192)
"""The distill stage's student: a quarter of the teacher's parameters, from scratch."""


@dataclass
class StageRow:
    """One stage's line of the report."""

    name: str
    command: str
    heldout_accuracy: float | None = None
    format_rate: float | None = None
    mean_reward: float | None = None
    sampled_accuracy: float | None = None
    pass_at_k: float | None = None
    short_style_rate: float | None = None
    reward_model_score: float | None = None
    tokens_per_second: float | None = None
    train_seconds: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def write_base_model(folder: Path, shape: ModelShape) -> Path:
    """A config-only model folder (``fastalign pretrain`` initialises from it) with the task's tokenizer."""
    from transformers import LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def demo_recipe(
    root: Path, files: dict[str, Path], base: Path, student: Path, seed: int = 0
) -> tuple[dict[str, Any], list[str]]:
    """The built-in r1 recipe with a pre-training stage in front, its distill stage on, the demo's sizes, every
    stage's training ``seed``; and its --set values."""
    recipe, _ = load_recipe("r1")
    recipe = copy.deepcopy(recipe)
    pretrain = {
        "name": "pretrain",
        "command": "pretrain",
        "args": {"model_name_or_path": str(base), "dataset_name": str(files["pretrain"])},
    }
    recipe["stages"] = [pretrain, *recipe["stages"]]
    for stage in recipe["stages"]:
        stage["args"] = {**stage.get("args", {}), **STAGE_ARGS[stage["name"]]}
    recipe["defaults"] = {**recipe.get("defaults", {}), **DEFAULTS, "seed": seed}
    sets = [
        f"model_name_or_path={root / 'pretrain'}",
        f"cot_dataset={files['cot']}",
        f"reasoning_prompts={files['prompts']}",
        f"general_dataset={files['general']}",
        f"preference_dataset={files['preferences']}",
        f"student_model_name_or_path={student}",
        # R1's last RL stage: reasoning prompts for the rules and general prompts for the reward model.
        f"final_rl.dataset_name={files['final_prompts']}",
    ]
    return recipe, sets


def _log_history(folder: Path) -> list[dict[str, Any]]:
    state = folder / "trainer_state.json"
    return json.loads(state.read_text()).get("log_history", []) if state.exists() else []


def training_speed(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """``(tokens per second, seconds)`` of a training run from its log history: the last ``num_tokens`` logged
    (training tokens, without padding; for GRPO the prompt and completion tokens sampled) over ``train_runtime``."""
    runtime = next((entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry), None)
    tokens = next((entry["num_tokens"] for entry in reversed(history) if "num_tokens" in entry), None)
    if runtime is None or tokens is None or runtime <= 0:
        return None, runtime
    return float(tokens) / float(runtime), float(runtime)


def evaluate_stage(stage: Stage, files: dict[str, Path]) -> StageRow:
    """The report row of a finished stage (see the module docstring for what is measured)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastalign.demo.evaluate import (
        evaluate_general,
        evaluate_policy,
        evaluate_reward_model,
        read_jsonl,
        sample_policy,
    )

    row = StageRow(stage.name, stage.command)
    if stage.command == "rejection-sample":
        kept = read_jsonl(stage.args["output_path"])
        rewards = [r["reward"] for r in kept if r.get("reward") is not None]
        row.mean_reward = sum(rewards) / len(rewards) if rewards else None
        row.notes = {"rows_written": len(kept), "sampled_rows_kept": len(rewards)}
        return row
    folder = Path(stage.args["output_dir"])
    row.tokens_per_second, row.train_seconds = training_speed(_log_history(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.random.fork_rng():
        if stage.command == "reward":
            row.heldout_accuracy = evaluate_reward_model(folder, tokenizer, read_jsonl(files["heldout_preferences"]))
            row.notes = {"heldout_accuracy": "pairs: chosen scored above rejected"}
            return row
        model = AutoModelForCausalLM.from_pretrained(folder)
        heldout = read_jsonl(files["heldout"])
        result = evaluate_policy(model, tokenizer, heldout, MAX_COMPLETION_TOKENS)
        torch.manual_seed(SAMPLING_SEED)  # every stage's samples from the same generator state
        sampled = sample_policy(model, tokenizer, heldout, MAX_COMPLETION_TOKENS, PASS_K, _GRPO_ARGS["temperature"])
    row.heldout_accuracy, row.format_rate, row.mean_reward = result.accuracy, result.format_rate, result.mean_reward
    row.sampled_accuracy, row.pass_at_k = sampled.sampled_accuracy, sampled.pass_at_k
    general = evaluate_general(model, tokenizer, read_jsonl(files["heldout_general"]), MAX_COMPLETION_TOKENS)
    row.short_style_rate = general.short_style_rate
    row.notes = {"examples": result.samples[:3]}
    (folder / "heldout_completions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in result.samples))
    (folder / "heldout_general_completions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in general.samples))
    return row


def distill_notes(stage: Stage, rows: Sequence[StageRow]) -> dict[str, Any]:
    """The distill row's comparison: its teacher (the stage it was distilled from), the teacher's held-out
    accuracy from that stage's row, and both models' parameter counts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher_folder = Path(stage.args["teacher_model_name_or_path"])
    teacher = next((r for r in rows if r.name == teacher_folder.name), None)

    def parameters(folder: Path) -> int:
        with torch.device("meta"):  # counted only: no memory, no initialisation
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        return sum(p.numel() for p in model.parameters())

    return {
        "teacher": teacher_folder.name,
        "teacher_heldout_accuracy": None if teacher is None else teacher.heldout_accuracy,
        "teacher_parameters": parameters(teacher_folder),
        "student_parameters": parameters(Path(stage.args["output_dir"])),
    }


def score_with_reward_model(stages: Sequence[Stage], rows: Sequence[StageRow]) -> None:
    """Scores the held-out greedy answers of every policy stage (problems and general prompts) with the reward
    model of the ``reward`` stage (all stages, those before it too); the mean goes into ``reward_model_score``."""
    from transformers import AutoTokenizer

    from fastalign.demo.evaluate import read_jsonl, reward_model_scorer

    judge = next((stage for stage in stages if stage.command == "reward"), None)
    if judge is None:
        return
    folder = Path(judge.args["output_dir"])
    score = reward_model_scorer(folder, AutoTokenizer.from_pretrained(folder))
    by_name = {stage.name: stage for stage in stages}
    for row in rows:
        folder = Path(by_name[row.name].args.get("output_dir", ""))
        files = [folder / "heldout_completions.jsonl", folder / "heldout_general_completions.jsonl"]
        if row.format_rate is None or not all(path.is_file() for path in files):
            continue
        samples = [sample for path in files for sample in read_jsonl(path)]
        scores = score([s["prompt"] for s in samples], [s["completion"] for s in samples])
        row.reward_model_score = sum(scores) / max(len(scores), 1)


def _started_from(stage: Stage, stages: Sequence[Stage]) -> Stage | None:
    """The earlier stage whose output ``stage`` starts from (its ``model_name_or_path``), if any."""
    start = Path(str(stage.args.get("model_name_or_path", ""))).resolve()
    return next((s for s in stages if Path(str(s.args.get("output_dir", ""))).resolve() == start), None)


def stage_summaries(stages: Sequence[Stage], rows: Sequence[StageRow]) -> list[str]:
    """One line per stage saying what it added: each policy stage's numbers against the stage it started from."""
    by_name = {row.name: row for row in rows}
    measures = (
        ("heldout_accuracy", "accuracy"),
        ("sampled_accuracy", "sampled accuracy"),
        ("pass_at_k", f"pass@{PASS_K}"),
        ("format_rate", "format"),
        ("short_style_rate", "short style"),
        ("reward_model_score", "reward-model score"),
    )
    lines = []
    for stage in stages:
        row = by_name.get(stage.name)
        if row is None:
            continue
        if stage.command == "rejection-sample":
            lines.append(
                f"{stage.name}: kept the best correct sample of {row.notes.get('sampled_rows_kept', 0)} prompts "
                f"({row.notes.get('rows_written', 0)} rows with the non-reasoning mix) to train on"
            )
            continue
        if stage.command == "reward":
            lines.append(
                f"{stage.name}: prefers the chosen completion in {_cell(row.heldout_accuracy, 3)} of held-out pairs"
            )
            continue
        origin = _started_from(stage, stages)
        before = by_name.get(origin.name) if origin is not None else None
        parts = []
        for key, label in measures:
            after_value = getattr(row, key)
            if after_value is None:
                continue
            before_value = getattr(before, key) if before is not None else None
            digits = 2 if key == "reward_model_score" else 3
            if before_value is None:
                parts.append(f"{label} {_cell(after_value, digits)}")
            else:
                parts.append(f"{label} {_cell(before_value, digits)} -> {_cell(after_value, digits)}")
        source = f" (from {origin.name})" if origin is not None else ""
        lines.append(f"{stage.name}{source}: " + ", ".join(parts))
    return lines


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(rows: Sequence[StageRow]) -> str:
    """The report as a text table, one line per stage."""
    header = f"{'stage':<14} {'command':<17} {'held-out acc':>12} {'format':>7} {'reward':>7} {'tokens/s':>9} {'s':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<14} {r.command:<17} {_cell(r.heldout_accuracy, 3):>12} {_cell(r.format_rate, 3):>7} "
            f"{_cell(r.mean_reward, 3):>7} {_cell(r.tokens_per_second, 0):>9} {_cell(r.train_seconds, 0):>6}"
        )
    return "\n".join(lines)


def rl_gains(rows: Sequence[StageRow]) -> list[dict[str, Any]]:
    """Each RL stage against the SFT stage it started from (r1: cold_start -> reasoning_rl, reasoning_sft ->
    final_rl): held-out accuracy before and after, whether it rose, and the reward model's score before and after
    (``None`` where not measured)."""
    by_name = {r.name: r for r in rows}
    gains = []
    for sft, rl in (("cold_start", "reasoning_rl"), ("reasoning_sft", "final_rl")):
        if sft in by_name and rl in by_name and by_name[rl].heldout_accuracy is not None:
            before, after = by_name[sft].heldout_accuracy, by_name[rl].heldout_accuracy
            gains.append(
                {
                    "from": sft,
                    "to": rl,
                    "before": before,
                    "after": after,
                    "raised": after > before,
                    "score_before": by_name[sft].reward_model_score,
                    "score_after": by_name[rl].reward_model_score,
                }
            )
    return gains


def gain_line(gain: dict[str, Any]) -> str:
    """The printed verdict on one RL stage: the reasoning stage is judged by held-out accuracy, the final one (whose
    reward model scores what the rules do not) by the reward model's score, with accuracy beside it."""
    accuracy = f"held-out accuracy {gain['from']} {gain['before']:.3f} -> {gain['after']:.3f}"
    if gain["to"] == "final_rl" and gain["score_before"] is not None and gain["score_after"] is not None:
        verdict = "raised" if gain["score_after"] > gain["score_before"] else "did NOT raise"
        return (
            f"{gain['to']} {verdict} the reward model's score: {gain['score_before']:.2f} -> "
            f"{gain['score_after']:.2f} ({accuracy})"
        )
    return f"{gain['to']} {'raised' if gain['raised'] else 'did NOT raise'} {accuracy}"


SEED_SPREAD = Path(__file__).with_name("seed_spread.json")
"""Per-stage held-out accuracy over several seeds (``python -m fastalign.demo.seeds`` writes it; docs/rl.md shows
it): the plot draws each stage's range across the seeds behind this run's numbers."""


def read_seed_spread(path: Path = SEED_SPREAD) -> dict[str, dict[str, float]]:
    """``{stage: {"mean", "min", "max"}}`` of held-out accuracy from ``path``; empty when there is none."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("heldout_accuracy", {})


def plot_report(
    rows: Sequence[StageRow],
    histories: dict[str, list[dict]],
    path: Path,
    spread: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Two panels: after each policy stage, held-out greedy accuracy (with the seeds' range from ``spread``),
    sampled accuracy, pass@k, format rate and the share of short general answers; and during the RL stages their
    training reward per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8))
    policy = [r for r in rows if r.format_rate is not None]
    names = [r.name for r in policy]
    places = list(range(len(names)))
    spread = spread or {}
    known = [(i, spread[n]) for i, n in enumerate(names) if n in spread]
    if known:
        lows = [s["mean"] - s["min"] for _, s in known]
        highs = [s["max"] - s["mean"] for _, s in known]
        top.errorbar(
            [i for i, _ in known],
            [s["mean"] for _, s in known],
            yerr=[lows, highs],
            fmt="none",
            ecolor="grey",
            capsize=6,
            label="greedy accuracy: range over the documented seeds",
        )
    top.plot(places, [r.heldout_accuracy for r in policy], marker="o", label="greedy accuracy (this run)")
    top.plot(places, [r.sampled_accuracy for r in policy], marker="^", label="sampled accuracy")
    top.plot(places, [r.pass_at_k for r in policy], marker="v", linestyle=":", label=f"pass@{PASS_K}")
    top.plot(places, [r.format_rate for r in policy], marker="s", linestyle="--", label="format rate")
    top.plot(
        places,
        [r.short_style_rate for r in policy],
        marker="d",
        linestyle="-.",
        label="short answers to general prompts (the reward model's preference)",
    )
    top.set_xticks(places, names)
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("fraction of held-out problems")
    top.set_title("after each policy stage (problems never trained on; sampled at the RL temperature)")
    top.legend(loc="lower right", fontsize="small")
    offset = 0
    for name in ("reasoning_rl", "final_rl"):
        logged = [e for e in histories.get(name, []) if "reward" in e]
        if logged:
            steps = [offset + e["step"] for e in logged]
            line = bottom.plot(steps, [e["reward"] for e in logged], marker=".", label=f"{name}: reward")[0]
            accuracy = [e.get("rewards/accuracy_reward/mean") for e in logged]
            bottom.plot(steps, accuracy, linestyle="--", color=line.get_color(), label=f"{name}: sampled accuracy")
            offset = steps[-1]
    bottom.set_xlabel("GRPO step (the two RL stages one after the other)")
    bottom.set_ylabel("mean over the sampled completions")
    bottom.set_title("during RL: the stage's weighted reward and accuracy_reward of the sampled completions")
    if offset:
        bottom.legend(loc="upper left", fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run_demo(
    output_dir: str | Path,
    *,
    smoke: bool = False,
    seed: int = 0,
    shape: ModelShape = ModelShape(),
    student_shape: ModelShape = STUDENT_SHAPE,
) -> dict:
    """Runs the demo into ``output_dir`` (finished stages of an earlier run are reused); returns the report."""
    if importlib.util.find_spec("matplotlib") is None:  # checked before minutes of training, not after
        raise SystemExit("fastalign demo: the report's plot needs matplotlib: pip install 'fastalign[demo]'")
    start = time.perf_counter()
    root = Path(output_dir)
    sizes = SMOKE_SIZES if smoke else TaskSizes()
    files = write_task(root / "data", sizes, seed=seed)
    base = write_base_model(root / "base", shape)
    student = write_base_model(root / "student_base", student_shape)
    recipe, sets = demo_recipe(root, files, base, student, seed)
    stages = plan(recipe, "r1", str(root), sets, smoke=smoke)
    rows: list[StageRow] = []

    def report_stage(stage: Stage, ran: bool) -> None:
        row = evaluate_stage(stage, files)
        if stage.command == "distill":
            row.notes.update(distill_notes(stage, rows))
        rows.append(row)
        print(f"\n{format_table([row])}\n", file=sys.stderr, flush=True)

    run_pipeline(stages, on_stage_done=report_stage)
    score_with_reward_model(stages, rows)
    histories = {stage.name: _log_history(stage.folder) for stage in stages}
    report = {
        "stages": [{**asdict(r)} for r in rows],
        "rl_gains": rl_gains(rows),
        "seconds": time.perf_counter() - start,
        "smoke": smoke,
        "task": asdict(sizes),
        "model": asdict(shape),
        "student_model": asdict(student_shape),
        "summary": stage_summaries(stages, rows),
    }
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_report(rows, histories, root / "report.png", read_seed_spread())
    print("\n" + format_table(rows))
    print("\nwhat each stage added (held-out problems):")
    for line in report["summary"]:
        print(f"  {line}")
    for gain in report["rl_gains"]:
        print(gain_line(gain))
    for row in rows:
        if row.command == "distill" and row.heldout_accuracy is not None:
            notes = row.notes
            print(
                f"{row.name}: the student ({notes['student_parameters']:,} parameters, from scratch) answers "
                f"{row.heldout_accuracy:.3f} of the held-out problems, its teacher {notes['teacher']} "
                f"({notes['teacher_parameters']:,}) {_cell(notes['teacher_heldout_accuracy'], 3)}"
            )
    print(f"report: {root / 'report.json'}, plot: {root / 'report.png'} ({report['seconds']:.0f} s in all)")
    return report


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastalign demo",
        description="DeepSeek-R1's recipe (pretrain -> cold-start SFT -> GRPO -> rejection sampling + SFT -> reward "
        "model -> GRPO) on a synthetic addition task with a tiny model trained from scratch, on CPU. Prints a table "
        "per stage and writes OUTPUT_DIR/report.json and OUTPUT_DIR/report.png.",
    )
    parser.add_argument("--output_dir", default="fastalign-demo", help="where everything goes (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="a few rows and 2 steps per stage (a check, not a demo)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the task's split and of every stage's training (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str]) -> dict:
    options = demo_parser().parse_args(list(argv))
    return run_demo(options.output_dir, smoke=options.smoke, seed=options.seed)
