"""`fastalign demo`: the synthetic task is right and leak-free, the evaluation scores what it should, and the
whole r1 pipeline runs end to end (in its --smoke configuration; `make demo` runs the full one)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
import torch

from fastalign.demo.evaluate import evaluate_policy, read_jsonl
from fastalign.demo.run import STAGE_ARGS, StageRow, format_table, rl_gains, run_demo, training_speed
from fastalign.demo.task import (
    WIDTH,
    TaskSizes,
    build_tokenizer,
    completion,
    general_completion,
    general_prompt,
    prompt,
    write_task,
)
from fastalign.rewards import accuracy_reward, think_format_reward

SMALL = TaskSizes(heldout=40, cot=30, prompts=30, preferences=30, pretrain_worked=200, general=10)


def _worked_sum(text: str) -> int:
    """Re-does the column arithmetic written in a completion, checking each step, and returns the answer."""
    steps = re.fullmatch(r"<think>(.*)</think><answer>(\d+)</answer>", text)
    assert steps is not None, text
    digits, carry = "", 0
    for step in steps.group(1).split(","):
        x, y, c, total, so_far = re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d\d)>(\d+)", step).groups()
        assert int(c) == carry and int(total) == int(x) + int(y) + int(c)
        digits = total[1] + digits
        assert so_far == digits
        carry = int(total) // 10
    assert steps.group(2) == ("1" if carry else "") + digits
    return int(steps.group(2))


def _is_correct_work(text: str, total: int) -> bool:
    try:
        return _worked_sum(text) == total
    except (AssertionError, AttributeError):
        return False


@pytest.mark.parametrize("a, b", [(0, 0), (5, 7), (347, 68), (999, 999), (500, 500), (1, 999)])
def test_completion_works_the_sum_column_by_column(a, b):
    text = completion(a, b)
    assert _worked_sum(text) == a + b
    assert text.count(",") == WIDTH - 1
    assert accuracy_reward([text], solution=[str(a + b)]) == [1.0]
    assert think_format_reward([text]) == [1.0]


def test_random_completions_are_correct_sums():
    rng = random.Random(1)
    for _ in range(300):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        assert _worked_sum(completion(a, b)) == a + b


def test_tokenizer_gives_one_token_per_character_and_decodes_exactly():
    tokenizer = build_tokenizer()
    text = prompt(347, 68) + completion(347, 68)
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    pieces = tokenizer.convert_ids_to_tokens(ids[1:])
    assert "<unk>" not in pieces
    assert pieces[: len("Q:347+068=")] == list("Q:347+068=")
    assert "<think>" in pieces and "</answer>" in pieces
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    general = general_prompt(41) + general_completion(41)
    assert tokenizer.decode(tokenizer(general)["input_ids"], skip_special_tokens=True) == general


def test_task_files_have_their_formats_and_no_heldout_leak(tmp_path):
    files = write_task(tmp_path, SMALL, seed=3)
    rows = {name: read_jsonl(path) for name, path in files.items()}
    assert len(rows["heldout"]) == SMALL.heldout and len(rows["cot"]) == SMALL.cot
    assert set(rows["cot"][0]) == {"prompt", "completion"}
    assert set(rows["prompts"][0]) == {"prompt", "solution"}
    assert set(rows["preferences"][0]) == {"prompt", "chosen", "rejected"}
    heldout = {row["prompt"] for row in rows["heldout"]}
    training_text = "\n".join(
        json.dumps(row) for name in ("pretrain", "cot", "prompts", "preferences", "general") for row in rows[name]
    )
    assert not any(question in training_text for question in heldout)
    for row in rows["prompts"] + rows["heldout"]:
        a, b = map(int, re.fullmatch(r"Q:(\d+)\+(\d+)=", row["prompt"]).groups())
        assert int(row["solution"]) == a + b
    for row in rows["preferences"] + rows["heldout_preferences"]:
        a, b = map(int, re.fullmatch(r"Q:(\d+)\+(\d+)=", row["prompt"]).groups())
        assert _worked_sum(row["chosen"]) == a + b
        assert not _is_correct_work(row["rejected"], a + b)  # a wrong answer, a slip in a column, or no working
    assert write_task(tmp_path / "again", SMALL, seed=3)["heldout"].read_text() == files["heldout"].read_text()


class _AnswerModel(torch.nn.Module):
    """Generates a fixed completion per prompt (right for some problems, wrong or badly formatted for others)."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        rows = [
            self.tokenizer(self.answers[p], add_special_tokens=False)["input_ids"][:max_new_tokens] for p in prompts
        ]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        tail = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, tail], dim=1)


def test_evaluate_policy_scores_answers_and_format():
    tokenizer = build_tokenizer()
    problems = [(12, 30), (7, 8), (450, 551), (99, 1)]
    answers = {
        prompt(12, 30): completion(12, 30),  # right, formatted
        prompt(7, 8): completion(7, 9),  # wrong answer, formatted
        prompt(450, 551): f"<answer>{450 + 551}</answer>",  # right, no reasoning
        prompt(99, 1): completion(99, 1),  # right, formatted
    }
    rows = [{"prompt": prompt(a, b), "solution": str(a + b)} for a, b in problems]
    result = evaluate_policy(_AnswerModel(tokenizer, answers), tokenizer, rows, max_new_tokens=64, batch_size=3)
    assert result.accuracy == pytest.approx(3 / 4)
    assert result.format_rate == pytest.approx(3 / 4)
    assert result.mean_reward == pytest.approx(3 / 4 + 0.5 * 3 / 4)
    assert [s["correct"] for s in result.samples] == [True, False, True, True]


def test_training_speed_reads_the_trainer_log():
    history = [
        {"loss": 1.0, "num_tokens": 100.0, "step": 1},
        {"num_tokens": 300.0, "step": 2},
        {"train_runtime": 1.5, "num_tokens": 300.0, "step": 2},
    ]
    assert training_speed(history) == (200.0, 1.5)
    assert training_speed([{"train_runtime": 2.0}]) == (None, 2.0)
    assert training_speed([]) == (None, None)


def test_rl_gains_compare_each_rl_stage_with_its_sft_stage():
    rows = [
        StageRow("cold_start", "sft", 0.5),
        StageRow("reasoning_rl", "grpo", 0.6),
        StageRow("reasoning_sft", "sft", 0.7),
        StageRow("final_rl", "grpo", 0.65),
    ]
    gains = rl_gains(rows)
    assert [(g["from"], g["to"], g["raised"]) for g in gains] == [
        ("cold_start", "reasoning_rl", True),
        ("reasoning_sft", "final_rl", False),
    ]
    assert "0.650" in format_table(rows)


def test_demo_covers_every_stage_of_the_r1_recipe():
    from fastalign.pipeline import load_recipe

    recipe, _ = load_recipe("r1")
    assert list(STAGE_ARGS) == ["pretrain", *(stage["name"] for stage in recipe["stages"])]


def test_demo_smoke_runs_the_pipeline_end_to_end_and_writes_the_report(tmp_path, capsys):
    report = run_demo(tmp_path / "demo", smoke=True)
    names = ["pretrain", "cold_start", "reasoning_rl", "rejection", "reasoning_sft", "rm", "final_rl", "distill"]
    written = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert written["stages"] == report["stages"]
    assert [s["name"] for s in written["stages"]] == names
    by_name = {s["name"]: s for s in written["stages"]}
    for name in ("pretrain", "cold_start", "reasoning_rl", "reasoning_sft", "final_rl"):
        stage = by_name[name]
        assert 0.0 <= stage["heldout_accuracy"] <= 1.0 and 0.0 <= stage["format_rate"] <= 1.0
        assert stage["tokens_per_second"] > 0 and stage["train_seconds"] > 0
    assert 0.0 <= by_name["rm"]["heldout_accuracy"] <= 1.0
    distill = by_name["distill"]  # the student next to its teacher
    assert 0.0 <= distill["heldout_accuracy"] <= 1.0 and distill["notes"]["teacher"] == "final_rl"
    assert distill["notes"]["teacher_heldout_accuracy"] == by_name["final_rl"]["heldout_accuracy"]
    assert 0 < distill["notes"]["student_parameters"] < distill["notes"]["teacher_parameters"] / 3
    assert by_name["rejection"]["notes"]["rows_written"] > 0
    assert [(g["from"], g["to"]) for g in written["rl_gains"]] == [
        ("cold_start", "reasoning_rl"),
        ("reasoning_sft", "final_rl"),
    ]
    assert (tmp_path / "demo" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert all(name in printed for name in names) and "held-out acc" in printed
    # A second run reuses every finished stage and reports them again.
    again = run_demo(tmp_path / "demo", smoke=True)
    assert [s["name"] for s in again["stages"]] == names
    assert "done before, skipped" in capsys.readouterr().err


def test_demo_command_line_help():
    result = subprocess.run([sys.executable, "-m", "fastalign", "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--output_dir" in result.stdout and "report.json" in result.stdout
    listing = subprocess.run([sys.executable, "-m", "fastalign", "--help"], capture_output=True, text=True).stdout
    assert "demo" in listing
