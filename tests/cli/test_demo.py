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

from fastalign.demo import seeds
from fastalign.demo.evaluate import evaluate_policy, read_jsonl, sample_policy
from fastalign.demo.run import (
    STAGE_ARGS,
    StageRow,
    format_table,
    gain_line,
    read_seed_spread,
    rl_gains,
    run_demo,
    stage_summaries,
    training_speed,
)
from fastalign.demo.task import (
    STYLES,
    WIDTH,
    TaskSizes,
    build_tokenizer,
    completion,
    general_completion,
    general_prompt,
    general_style,
    prompt,
    write_task,
)
from fastalign.pipeline import Stage
from fastalign.rewards import accuracy_reward, think_format_reward

SMALL = TaskSizes(heldout=40, cot=30, prompts=30, preferences=30, pretrain_worked=200, general=10, heldout_general=12)


def _worked_sum(text: str, pattern: str = r"<think>(.*)</think><answer>(\d+)</answer>") -> int:
    """Re-does the column arithmetic written in a completion (steps and answer matched by ``pattern``), checking
    each step, and returns the answer."""
    steps = re.fullmatch(pattern, text)
    assert steps is not None, text
    digits, carry = "", 0
    for step in steps.group(1).split(","):
        x, y, c, total, so_far = re.fullmatch(r"(\d)\+(\d)(?:\+(\d))?=(\d\d)>(\d+)", step).groups()
        c = "0" if c is None and carry == 0 else c  # a carry may be left out where it is 0
        assert c is not None and int(c) == carry and int(total) == int(x) + int(y) + int(c)
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


def test_random_completions_are_correct_sums_with_or_without_zero_carries():
    rng = random.Random(1)
    for _ in range(300):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        full, short = completion(a, b), completion(a, b, zero_carries=False)
        assert _worked_sum(full) == _worked_sum(short) == a + b
        assert len(full) - len(short) == 2 * full.count("+0=") >= 2  # the first column has no carry coming in
    assert completion(347, 68, False) == "<think>7+8=15>5,4+6+1=11>15,3+0+1=04>415</think><answer>415</answer>"


def test_general_answers_come_in_two_styles_both_right():
    assert general_completion(347, "short") == "<answer>348</answer>"
    assert general_completion(347, "full") == "<answer>347+1=348</answer>"
    for style in STYLES:
        assert general_style(general_completion(41, style)) == style
    assert general_style("<answer>42") is None and general_style("<think>x</think><answer>42</answer>") is None
    with pytest.raises(ValueError, match="style='terse'"):
        general_completion(1, "terse")


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
    assert len(rows["heldout_general"]) == SMALL.heldout_general
    assert set(rows["cot"][0]) == {"prompt", "completion"}
    assert set(rows["prompts"][0]) == {"prompt", "solution"}
    assert set(rows["preferences"][0]) == {"prompt", "chosen", "rejected"}
    heldout = {row["prompt"] for row in rows["heldout"] + rows["heldout_general"]}
    training = ("pretrain", "cot", "prompts", "preferences", "general", "final_prompts")
    training_text = "\n".join(json.dumps(row) for name in training for row in rows[name])
    assert not any(question in training_text for question in heldout)
    for row in rows["prompts"] + rows["heldout"]:
        a, b = map(int, re.fullmatch(r"Q:(\d+)\+(\d+)=", row["prompt"]).groups())
        assert int(row["solution"]) == a + b
    for row in rows["cot"]:
        a, b = map(int, re.fullmatch(r"Q:(\d+)\+(\d+)=", row["prompt"]).groups())
        assert _worked_sum(row["completion"]) == a + b
    # Worked solutions write "+0" or leave it out, both ways in the cold start and in pre-training.
    assert {"+0=" in row["completion"] for row in rows["cot"]} == {True, False}
    splits = [{row["prompt"] for row in rows[name]} for name in ("heldout", "cot", "prompts")]
    assert sum(map(len, splits)) == len(set().union(*splits))  # disjoint
    for row in rows["preferences"] + rows["heldout_preferences"]:
        if row["prompt"].startswith("Q:"):  # right against wrong: what the rules score too
            a, b = map(int, re.fullmatch(r"Q:(\d+)\+(\d+)=", row["prompt"]).groups())
            assert _worked_sum(row["chosen"]) == a + b
            assert not _is_correct_work(row["rejected"], a + b)  # a wrong answer, a slip in a column, or no working
        else:  # both right: a preference only the reward model can learn
            n = int(re.fullmatch(r"N:(\d+)=", row["prompt"]).group(1))
            assert (row["chosen"], row["rejected"]) == (general_completion(n, "short"), general_completion(n, "full"))
    assert {general_style(row["completion"]) for row in rows["general"]} == set(STYLES)
    # The final RL stage sees the RL problems (with their solutions) and the general prompts (without).
    assert rows["final_prompts"] == rows["prompts"] + [{"prompt": row["prompt"]} for row in rows["general"]]
    # Pre-training has the working in its own notation and no tag at all.
    texts = [row["text"] for row in rows["pretrain"]]
    assert not any(tag in text for text in texts for tag in ("<think>", "</think>", "<answer>", "</answer>"))
    worked = [text for text in texts if text.startswith("Q:")]
    assert len(worked) == SMALL.pretrain_worked
    for text in worked:
        a, b = map(int, re.match(r"Q:(\d+)\+(\d+)=", text).groups())
        assert _worked_sum(text, r"Q:\d+\+\d+=\[(.*)\]=(\d+)") == a + b
    assert {"+0=" in text for text in worked} == {True, False}
    assert write_task(tmp_path / "again", SMALL, seed=3)["heldout"].read_text() == files["heldout"].read_text()


class _AnswerModel(torch.nn.Module):
    """Generates fixed completions per prompt (right for some problems, wrong or badly formatted for others): a
    string, or a list of them handed out in turn, one per returned sequence."""

    def __init__(self, tokenizer, answers: dict[str, str | list[str]]):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.device = torch.device("cpu")
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, num_return_sequences=1, **kwargs):
        self.calls.append({"num_return_sequences": num_return_sequences, **kwargs})
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        texts = []
        for p in prompts:
            answers = self.answers[p] if isinstance(self.answers[p], list) else [self.answers[p]]
            texts += [answers[i % len(answers)] for i in range(num_return_sequences)]
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"][:max_new_tokens] for t in texts]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        tail = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, dim=0), tail], dim=1)


def test_sample_policy_counts_sampled_accuracy_and_pass_at_k():
    tokenizer = build_tokenizer()
    right, wrong = completion(12, 30), completion(12, 31)
    answers = {
        prompt(12, 30): [wrong, right, wrong, wrong],  # 1 of 4 right: counts for pass@4
        prompt(7, 8): [completion(7, 9)] * 4,  # never right
        prompt(1, 2): [completion(1, 2)] * 4,  # always right
    }
    rows = [{"prompt": p, "solution": str(sum(map(int, re.findall(r"\d+", p))))} for p in answers]
    model = _AnswerModel(tokenizer, answers)
    result = sample_policy(model, tokenizer, rows, max_new_tokens=64, k=4, temperature=0.5, batch_size=2)
    assert result.sampled_accuracy == pytest.approx((1 + 0 + 4) / 12)
    assert result.pass_at_k == pytest.approx(2 / 3)
    assert (result.k, result.temperature) == (4, 0.5)
    assert all(c["do_sample"] and c["temperature"] == 0.5 and c["num_return_sequences"] == 4 for c in model.calls)
    with pytest.raises(ValueError, match="k=0"):
        sample_policy(model, tokenizer, rows, max_new_tokens=64, k=0, temperature=0.5)


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
    assert gain_line(gains[0]) == "reasoning_rl raised held-out accuracy cold_start 0.500 -> 0.600"
    assert gain_line(gains[1]).startswith("final_rl did NOT raise held-out accuracy")  # no reward-model scores
    rows[2].reward_model_score, rows[3].reward_model_score = 1.0, 2.5
    assert gain_line(rl_gains(rows)[1]) == (
        "final_rl raised the reward model's score: 1.00 -> 2.50 (held-out accuracy reasoning_sft 0.700 -> 0.650)"
    )


def _stage(tmp_path, name: str, command: str, start: str | None = None) -> Stage:
    args = {"output_dir": str(tmp_path / name)}
    if start is not None:
        args["model_name_or_path"] = str(tmp_path / start)
    return Stage(name, command, args, tmp_path / name)


def test_stage_summaries_compare_each_stage_with_the_one_it_started_from(tmp_path):
    stages = [
        _stage(tmp_path, "pretrain", "pretrain", "base"),
        _stage(tmp_path, "cold_start", "sft", "pretrain"),
        _stage(tmp_path, "reasoning_rl", "grpo", "cold_start"),
        Stage("rejection", "rejection-sample", {"output_path": str(tmp_path / "r.jsonl")}, tmp_path / "rejection"),
        _stage(tmp_path, "reasoning_sft", "sft", "pretrain"),
        _stage(tmp_path, "rm", "reward", "cold_start"),
        _stage(tmp_path, "final_rl", "grpo", "reasoning_sft"),
    ]
    rows = [
        StageRow("pretrain", "pretrain", 0.0, 0.0, sampled_accuracy=0.0, pass_at_k=0.0),
        StageRow("cold_start", "sft", 0.5, 0.9, sampled_accuracy=0.2, pass_at_k=0.6, reward_model_score=-1.0),
        StageRow("reasoning_rl", "grpo", 0.8, 1.0, sampled_accuracy=0.6, pass_at_k=0.85, reward_model_score=-1.5),
        StageRow("rejection", "rejection-sample", notes={"rows_written": 1200, "sampled_rows_kept": 950}),
        StageRow("reasoning_sft", "sft", 0.82, 1.0, short_style_rate=0.1, reward_model_score=-1.25),
        StageRow("rm", "reward", 0.99),
        StageRow("final_rl", "grpo", 0.81, 1.0, short_style_rate=0.9, reward_model_score=2.5),
    ]
    lines = dict(line.split(": ", 1) for line in stage_summaries(stages, rows))
    assert lines["pretrain"].startswith("accuracy 0.000")  # it started from no earlier stage
    assert "accuracy 0.500 -> 0.800" in lines["reasoning_rl (from cold_start)"]
    assert "pass@8 0.600 -> 0.850" in lines["reasoning_rl (from cold_start)"]
    assert "accuracy 0.000 -> 0.820" in lines["reasoning_sft (from pretrain)"]  # R1 retrains the base
    final = lines["final_rl (from reasoning_sft)"]
    assert "short style 0.100 -> 0.900" in final and "reward-model score -1.25 -> 2.50" in final
    assert "950 prompts" in lines["rejection"] and "0.990" in lines["rm"]


def _report(seconds: float, cold: float, rl: float, sft: float, final: float, scores=(0.0, 1.0)) -> dict:
    stages = [
        {"name": "cold_start", "format_rate": 1.0, "heldout_accuracy": cold, "reward_model_score": 0.0},
        {"name": "reasoning_rl", "format_rate": 1.0, "heldout_accuracy": rl, "reward_model_score": 0.0},
        {"name": "reasoning_sft", "format_rate": 1.0, "heldout_accuracy": sft, "reward_model_score": scores[0]},
        {"name": "rm", "format_rate": None, "heldout_accuracy": 0.99},
        {"name": "final_rl", "format_rate": 1.0, "heldout_accuracy": final, "reward_model_score": scores[1]},
    ]
    return {"seconds": seconds, "stages": stages}


def test_seed_targets_hold_only_when_they_hold_on_every_seed():
    good = [_report(500, 0.50, 0.70, 0.72, 0.71), _report(590, 0.40, 0.55, 0.60, 0.59)]
    assert [ok for _, ok, _ in seeds.targets(good)] == [True, True, True, True]
    small_gain = [*good, _report(500, 0.50, 0.59, 0.72, 0.71)]  # +9 points on one seed
    assert [ok for _, ok, _ in seeds.targets(small_gain)] == [False, True, True, True]
    lost = [*good, _report(500, 0.50, 0.70, 0.72, 0.69)]  # 3 points lost by the final stage
    assert [ok for _, ok, _ in seeds.targets(lost)] == [True, True, False, True]
    no_preference = [*good, _report(500, 0.5, 0.7, 0.72, 0.72, scores=(1.0, 0.9))]
    assert [ok for _, ok, _ in seeds.targets(no_preference)] == [True, False, True, True]
    slow = [*good, _report(601, 0.5, 0.7, 0.72, 0.72)]
    assert [ok for _, ok, _ in seeds.targets(slow)] == [True, True, True, False]


def test_seed_spread_and_table(tmp_path):
    reports = [_report(500, 0.5, 0.7, 0.72, 0.71), _report(500, 0.3, 0.6, 0.62, 0.65)]
    table = seeds.spread(reports)
    assert table["heldout_accuracy"]["reasoning_rl"] == {
        "mean": pytest.approx(0.65),
        "min": 0.6,
        "max": 0.7,
        "values": [0.7, 0.6],
    }
    assert "rm" not in table["reward_model_score"]  # not every report has it
    text = seeds.markdown_table(reports, [0, 1])
    assert "| reasoning_rl | 0.650 (0.600–0.700) |" in text and "| rm |" not in text
    path = tmp_path / "spread.json"
    path.write_text(json.dumps({"seeds": [0, 1], **table}))
    assert read_seed_spread(path)["cold_start"]["min"] == 0.3
    assert read_seed_spread(tmp_path / "none.json") == {}


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
        assert 0.0 <= stage["sampled_accuracy"] <= stage["pass_at_k"] <= 1.0
        assert 0.0 <= stage["short_style_rate"] <= 1.0
        assert isinstance(stage["reward_model_score"], float)  # the rm stage's judge scored its answers
        assert stage["tokens_per_second"] > 0 and stage["train_seconds"] > 0
    assert len(written["summary"]) == len(names) and written["summary"][2].startswith("reasoning_rl (from cold_start)")
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
    assert "what each stage added" in printed
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
    several = subprocess.run([sys.executable, "-m", "fastalign.demo.seeds", "--help"], capture_output=True, text=True)
    assert several.returncode == 0 and "--seeds" in several.stdout


def test_the_shipped_seed_spread_covers_every_policy_stage():
    spread = read_seed_spread()  # fastalign/demo/seed_spread.json, drawn by the plot
    for name in ("pretrain", "cold_start", "reasoning_rl", "reasoning_sft", "final_rl"):
        entry = spread[name]
        assert 0.0 <= entry["min"] <= entry["mean"] <= entry["max"] <= 1.0 and len(entry["values"]) >= 3
