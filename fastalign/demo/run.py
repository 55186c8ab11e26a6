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

REPORT_FIELDS = ("heldout_accuracy", "format_rate", "mean_reward", "tokens_per_second", "train_seconds")
"""The numbers of each stage's row in ``report.json`` (``None`` where a stage has no such number)."""

MAX_COMPLETION_TOKENS = 64
"""Generation budget of every stage and of the evaluation (a worked answer takes 48-50 tokens)."""

# The two GRPO stages' common settings (the final one adds its reward weights and KL).
_GRPO_ARGS = {
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "max_completion_length": MAX_COMPLETION_TOKENS,
    "max_prompt_length": 16,
    "learning_rate": 1.0e-4,
    "max_steps": 250,
    "logging_steps": 10,
    "temperature": 0.5,
}

# The recipe's stages, scaled to a ~1M-parameter model on 2 CPU cores. Everything not set here is the recipe's.
STAGE_ARGS: dict[str, dict[str, Any]] = {
    "pretrain": {
        "max_length": 256,
        "per_device_train_batch_size": 8,
        "learning_rate": 3.0e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "max_steps": 2400,
        "logging_steps": 100,
    },
    "cold_start": {
        "per_device_train_batch_size": 16,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 2,
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
        "learning_rate": 5.0e-4,
        "num_train_epochs": 2,
        "logging_steps": 10,
    },
    "rm": {"per_device_train_batch_size": 16, "learning_rate": 1.0e-3, "num_train_epochs": 2, "logging_steps": 10},
    "final_rl": {
        **_GRPO_ARGS,
        # A tiny reward model is a weak judge. At the recipe's weight 0.5 the policy learned to please it with wrong
        # answers (held-out accuracy 0.85 -> 0.00 in one run), and even at weight 0.1 when rewards were scaled by
        # the group's std: in a group where every answer is wrong only the reward model's score varies, and the
        # scaling blows it up. Unscaled rewards (Dr. GRPO), a small weight and a stronger KL keep it a tie-breaker.
        "reward_weights": [0.1, 1.0, 0.5],
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

SMOKE_SIZES = TaskSizes(heldout=16, cot=16, prompts=16, preferences=16, pretrain_worked=64, general=8)
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


def demo_recipe(root: Path, files: dict[str, Path], base: Path, student: Path) -> tuple[dict[str, Any], list[str]]:
    """The built-in r1 recipe with a pre-training stage in front, its distill stage on, the demo's sizes; and its
    --set values."""
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
    recipe["defaults"] = {**recipe.get("defaults", {}), **DEFAULTS}
    sets = [
        f"model_name_or_path={root / 'pretrain'}",
        f"cot_dataset={files['cot']}",
        f"reasoning_prompts={files['prompts']}",
        f"general_dataset={files['general']}",
        f"preference_dataset={files['preferences']}",
        f"student_model_name_or_path={student}",
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

    from fastalign.demo.evaluate import evaluate_policy, evaluate_reward_model, read_jsonl

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
        result = evaluate_policy(model, tokenizer, read_jsonl(files["heldout"]), MAX_COMPLETION_TOKENS)
    row.heldout_accuracy, row.format_rate, row.mean_reward = result.accuracy, result.format_rate, result.mean_reward
    row.notes = {"examples": result.samples[:3]}
    (folder / "heldout_completions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in result.samples))
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
    """Held-out accuracy of each RL stage against the SFT stage it started from (r1: cold_start -> reasoning_rl,
    reasoning_sft -> final_rl)."""
    by_name = {r.name: r for r in rows}
    gains = []
    for sft, rl in (("cold_start", "reasoning_rl"), ("reasoning_sft", "final_rl")):
        if sft in by_name and rl in by_name and by_name[rl].heldout_accuracy is not None:
            before, after = by_name[sft].heldout_accuracy, by_name[rl].heldout_accuracy
            gains.append({"from": sft, "to": rl, "before": before, "after": after, "raised": after > before})
    return gains


def plot_report(rows: Sequence[StageRow], histories: dict[str, list[dict]], path: Path) -> Path:
    """Two panels: held-out accuracy and format rate after each stage; the RL stages' training reward per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7))
    policy = [r for r in rows if r.format_rate is not None]
    names = [r.name for r in policy]
    top.plot(names, [r.heldout_accuracy for r in policy], marker="o", label="held-out accuracy")
    top.plot(names, [r.format_rate for r in policy], marker="s", linestyle="--", label="format rate")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("fraction of held-out problems")
    top.set_title("after each policy stage (greedy answers to problems never trained on)")
    top.legend(loc="lower right")
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
    recipe, sets = demo_recipe(root, files, base, student)
    stages = plan(recipe, "r1", str(root), sets, smoke=smoke)
    rows: list[StageRow] = []

    def report_stage(stage: Stage, ran: bool) -> None:
        row = evaluate_stage(stage, files)
        if stage.command == "distill":
            row.notes.update(distill_notes(stage, rows))
        rows.append(row)
        print(f"\n{format_table([row])}\n", file=sys.stderr, flush=True)

    run_pipeline(stages, on_stage_done=report_stage)
    histories = {stage.name: _log_history(stage.folder) for stage in stages}
    report = {
        "stages": [{**asdict(r)} for r in rows],
        "rl_gains": rl_gains(rows),
        "seconds": time.perf_counter() - start,
        "smoke": smoke,
        "task": asdict(sizes),
        "model": asdict(shape),
        "student_model": asdict(student_shape),
    }
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_report(rows, histories, root / "report.png")
    print("\n" + format_table(rows))
    for gain in report["rl_gains"]:
        verdict = "raised" if gain["raised"] else "did NOT raise"
        print(f"{gain['to']} {verdict} held-out accuracy: {gain['from']} {gain['before']:.3f} -> {gain['after']:.3f}")
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the task's problems (default: %(default)s)")
    return parser


def main(argv: Sequence[str]) -> dict:
    options = demo_parser().parse_args(list(argv))
    return run_demo(options.output_dir, smoke=options.smoke, seed=options.seed)
