"""The ``fastalign`` command end to end on a tiny model saved to disk: YAML + flag overrides, pre-training
from a config-only folder, and the errors and help a newcomer sees."""

import json
import subprocess
import sys

import pytest
import yaml
from tiny import addition_rows, tiny_causal_lm, word_tokenizer

from fastalign.cli import main, parse


@pytest.fixture
def workspace(tmp_path):
    model_dir = tmp_path / "model"
    tiny_causal_lm().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in addition_rows()))
    settings = {
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
        "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "report_to": "none",
        "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "max_length": 32, "save_strategy": "steps",
        "save_steps": 3, "disable_tqdm": True,
    }  # fmt: skip
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(settings))
    return tmp_path, config


def test_sft_from_yaml_with_a_flag_override(workspace):
    tmp_path, config = workspace
    main(["sft", "--config", str(config), "--max_steps", "3"])
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # the flag beat the file's max_steps: 2


def test_yaml_values_reach_the_configs(workspace):
    _, config = workspace
    script, model_args, sft = parse("sft", ["--config", str(config), "--learning_rate", "5e-4"])
    assert script.dataset_name.endswith("train.jsonl") and model_args.model_name_or_path.endswith("model")
    assert (sft.learning_rate, sft.max_steps, sft.max_length, sft.packing) == (5e-4, 2, 32, False)
    _, _, pretrain = parse("pretrain", ["--config", str(config)])
    assert pretrain.packing and pretrain.completion_only_loss is False


def test_pretrain_from_a_config_only_folder(workspace):
    tmp_path, config = workspace
    scratch = tmp_path / "scratch"
    tiny_causal_lm().config.save_pretrained(scratch)
    word_tokenizer().save_pretrained(scratch)
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": " ".join(row.values())}) for row in addition_rows()))
    main(["pretrain", "--config", str(config), "--model_name_or_path", str(scratch), "--dataset_name", str(text),
          "--output_dir", str(tmp_path / "pretrained")])  # fmt: skip
    assert (tmp_path / "pretrained" / "model.safetensors").exists()


def test_unknown_yaml_fields_and_missing_model_are_errors(workspace, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"learning_rat": 1e-3}))
    with pytest.raises(SystemExit, match=r"unknown fields \['learning_rat'\]"):
        parse("sft", ["--config", str(bad)])
    with pytest.raises(SystemExit):
        parse("sft", ["--dataset_name", "x.jsonl"])
    with pytest.raises(SystemExit, match="unknown command 'train'"):
        main(["train"])


def test_help_lists_the_commands_and_the_fields():
    top = subprocess.run([sys.executable, "-m", "fastalign", "--help"], capture_output=True, text=True, check=True)
    for command in ("pretrain", "sft", "reward", "dpo", "--model_name_or_path"):
        assert command in top.stdout
    sub = subprocess.run([sys.executable, "-m", "fastalign", "sft", "--help"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    for flag in ("--model_name_or_path", "--dataset_name", "--output_dir", "--max_steps", "--packing", "--config"):
        assert flag in sub.stdout


def test_reward_model_from_the_command_line(workspace):
    from transformers import LlamaForSequenceClassification

    tmp_path, config = workspace
    model_dir = tmp_path / "reward-init"
    base = tiny_causal_lm()
    LlamaForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 1})).save_pretrained(
        model_dir
    )
    word_tokenizer().save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": " zero ."} for row in addition_rows()]
    pairs.write_text("\n".join(json.dumps(row) for row in rows))
    main(["reward", "--config", str(config), "--model_name_or_path", str(model_dir), "--dataset_name", str(pairs),
          "--output_dir", str(tmp_path / "rm")])  # fmt: skip
    assert (tmp_path / "rm" / "model.safetensors").exists()


def test_dpo_from_the_command_line(workspace):
    tmp_path, config = workspace
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": " zero ."} for row in addition_rows()]
    pairs.write_text("\n".join(json.dumps(row) for row in rows))
    main(["dpo", "--config", str(config), "--dataset_name", str(pairs), "--output_dir", str(tmp_path / "dpo"),
          "--loss_type", "sigmoid", "hinge", "--loss_weights", "1.0", "0.5", "--beta", "0.2"])  # fmt: skip
    assert (tmp_path / "dpo" / "model.safetensors").exists()
    _, _, dpo = parse("dpo", ["--config", str(config), "--loss_type", "ipo"])
    assert dpo.loss_type == ["ipo"] and dpo.beta == 0.1
