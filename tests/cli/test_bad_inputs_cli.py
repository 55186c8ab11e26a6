"""Bad paths through the ``fastalign`` command and pipelines: a missing model folder, evaluation without a held-out
split, rejection sampling over its own input or keeping nothing, and a later pipeline stage's bad data found
before the first stage runs."""

from __future__ import annotations

import json
import sys

import pytest
from helpers.tiny import addition_rows, tiny_causal_lm, word_tokenizer

from fastalign.cli import main
from fastalign.models import load_causal_lm, load_reward_model
from fastalign.models.paths import missing_model_folder
from fastalign.pipeline import MARKER, check_stage_inputs, plan, run_pipeline

ZERO_REWARD = "def zero(completions, **kwargs):\n    return [0.0] * len(completions)\n"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    model = tmp_path / "model"
    tiny_causal_lm().save_pretrained(model)
    word_tokenizer().save_pretrained(model)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in addition_rows()))
    (tmp_path / "zero_rewards.py").write_text(ZERO_REWARD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "zero_rewards", raising=False)
    return tmp_path, model, data


@pytest.mark.parametrize("name", ["./no-model", "no-model/", "runs/sft/final", "~/no-such-model-folder"])
def test_a_missing_local_model_folder_says_it_does_not_exist(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    for load in (load_causal_lm, load_reward_model):
        with pytest.raises(
            FileNotFoundError,
            match=rf"^the model folder '{name}' does not exist \(.*; the nearest "
            "folder that exists is ",
        ):
            load(name)


def test_hub_ids_are_not_taken_for_missing_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert missing_model_folder("Qwen/Qwen2.5-0.5B") is None and missing_model_folder("gpt2") is None
    (tmp_path / "runs").mkdir()  # "runs/sft" could be a hub id, but the folder runs exists: a local path
    assert "does not exist" in missing_model_folder("runs/sft")


def test_the_command_names_the_missing_model_folder_before_loading_data(workspace):
    tmp_path, _, data = workspace
    with pytest.raises(SystemExit, match=r"^--model_name_or_path: the model folder '\./sft-out' does not exist"):
        main(["sft", "--model_name_or_path", "./sft-out", "--dataset_name", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match=r"^--reward_model_name_or_path: the model folder '\./rm' does not exist"):
        main(
            [
                "grpo",
                "--model_name_or_path",
                str(tmp_path / "model"),
                "--dataset_name",
                str(data),
                "--reward_model_name_or_path",
                "./rm",
                "--output_dir",
                "out",
            ]
        )


def test_evaluation_needs_a_held_out_split(workspace):
    _, model, data = workspace
    common = [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        "out",
        "--use_cpu",
        "true",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
    ]
    with pytest.raises(
        SystemExit,
        match=r"^--dataset_test_split 'test' \(--eval_strategy steps evaluates on it\): "
        r"the file .* has no 'test' split",
    ):
        main(["sft", *common])
    with pytest.raises(
        SystemExit,
        match=r"^--eval_strategy steps evaluates on --dataset_test_split, which is the "
        r"training split 'train'",
    ):
        main(["dpo", *common, "--dataset_test_split", "train"])


def _sample(model, data, output, *flags):
    main(
        [
            "rejection-sample",
            "--model_name_or_path",
            str(model),
            "--dataset_name",
            str(data),
            "--reward_funcs",
            "zero_rewards:zero",
            "--num_generations",
            "2",
            "--max_completion_length",
            "4",
            "--batch_size",
            "4",
            "--device",
            "cpu",
            "--disable_tqdm",
            "true",
            "--output_path",
            str(output),
            *flags,
        ]
    )


def test_rejection_sampling_refuses_to_overwrite_its_input(workspace):
    tmp_path, model, data = workspace
    before = data.read_text()
    for output, where in [(data, "is"), (tmp_path / "." / data.name, "is")]:
        with pytest.raises(SystemExit, match=rf"^--output_path .* {where} the input --dataset_name "):
            _sample(model, data.name, output)
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "train.jsonl").write_text(before)
    with pytest.raises(SystemExit, match=r"is inside the input --dataset_name "):
        _sample(model, folder, folder / "sampled.jsonl")
    assert data.read_text() == before and not (folder / "sampled.jsonl").exists()


def test_rejection_sampling_that_keeps_nothing_fails_with_the_numbers(workspace):
    tmp_path, model, data = workspace
    output = tmp_path / "sampled.jsonl"
    with pytest.raises(SystemExit) as error:
        _sample(model, data, output, "--threshold", "0.5")
    assert str(error.value).startswith(
        "fastalign rejection-sample: kept 0 of 20 sampled completions (10 prompts x 2; --keep best, --threshold 0.5, "
        "the best reward was 0; 0 unscored, "
    )
    assert f"nothing written to {output}" in str(error.value) and not output.exists()


def _recipe(model, sft_data, dpo_data, dpo_model="{sft.output_dir}"):
    sft = {"model_name_or_path": str(model), "dataset_name": str(sft_data)}
    dpo = {"model_name_or_path": dpo_model, "dataset_name": str(dpo_data)}
    return {"stages": [{"name": "sft", "command": "sft", "args": sft}, {"name": "dpo", "command": "dpo", "args": dpo}]}


def test_a_later_stages_bad_dataset_fails_before_the_first_stage_runs(workspace):
    tmp_path, model, data = workspace
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b",\n')
    stages = plan(_recipe(model, data, pairs), "bad", str(tmp_path / "run"), smoke=True)
    with pytest.raises(
        SystemExit,
        match=rf"^fastalign pipeline: stage 'dpo' \(dpo\): --dataset_name: {pairs}:2: not "
        "valid JSON",
    ):
        run_pipeline(stages)
    assert not (tmp_path / "run").exists()  # the sft stage never started
    for dataset, message in [
        (tmp_path / "missing.jsonl", r"--dataset_name: dataset '.*missing.jsonl' not found"),
        (
            data,
            r"--dataset_name .*train.jsonl: the dpo trainer cannot read this dataset: missing columns 'chosen', "
            "'rejected'",
        ),
    ]:
        stages = plan(_recipe(model, data, dataset), "bad", str(tmp_path / "run"), smoke=True)
        with pytest.raises(SystemExit, match=rf"^fastalign pipeline: stage 'dpo' \(dpo\): {message}"):
            check_stage_inputs(stages, [True, True])
    stages = plan(_recipe(model, data, pairs, dpo_model="./no-model"), "bad", str(tmp_path / "run"), smoke=True)
    with pytest.raises(SystemExit, match=r"stage 'dpo' \(dpo\): --model_name_or_path: the model folder '\./no-model'"):
        check_stage_inputs(stages, [True, True])


def test_inputs_written_by_an_earlier_stage_or_of_finished_stages_are_not_checked(workspace):
    tmp_path, model, data = workspace
    root = tmp_path / "run"
    recipe = _recipe(model, data, "{sft.output_dir}/pairs.jsonl")  # neither exists yet: the sft stage writes them
    check_stage_inputs(plan(recipe, "ok", str(root), smoke=True), [True, True])
    broken = _recipe(tmp_path / "gone", tmp_path / "gone.jsonl", data)  # every input bad, but both stages finished
    stages = plan(broken, "ok", str(root), smoke=True)
    for stage in stages:
        stage.folder.mkdir(parents=True)
        (stage.folder / MARKER).write_text(json.dumps(stage.record()))
    assert run_pipeline(stages) == []  # nothing of theirs is read again
