"""The ``fastalign`` command end to end on a tiny model saved to disk: YAML + flag overrides, pre-training
from a config-only folder, and the errors and help a newcomer sees."""

import json
import subprocess
import sys

import pytest
import yaml
from helpers.tiny import addition_rows, tiny_causal_lm, word_tokenizer

from fastalign.cli import main
from fastalign.commands import parse


@pytest.fixture
def workspace(tmp_path):
    model_dir = tmp_path / "model"
    tiny_causal_lm().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in addition_rows()))
    settings = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "max_length": 32,
        "save_strategy": "steps",
        "save_steps": 3,
        "disable_tqdm": True,
    }
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
    main(
        [
            "pretrain",
            "--config",
            str(config),
            "--model_name_or_path",
            str(scratch),
            "--dataset_name",
            str(text),
            "--output_dir",
            str(tmp_path / "pretrained"),
        ]
    )
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
    sub = subprocess.run(
        [sys.executable, "-m", "fastalign", "sft", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--model_name_or_path", "--dataset_name", "--output_dir", "--max_steps", "--packing", "--config"):
        assert flag in sub.stdout


def _pairs(tmp_path):
    """Preference pairs: each prompt's answer chosen over " zero ."."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": " zero ."} for row in addition_rows()]
    pairs.write_text("\n".join(json.dumps(row) for row in rows))
    return pairs


def test_reward_model_from_the_command_line(workspace):
    from transformers import LlamaForSequenceClassification

    tmp_path, config = workspace
    model_dir = tmp_path / "reward-init"
    base = tiny_causal_lm()
    LlamaForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 1})).save_pretrained(
        model_dir
    )
    word_tokenizer().save_pretrained(model_dir)
    pairs = _pairs(tmp_path)
    main(
        [
            "reward",
            "--config",
            str(config),
            "--model_name_or_path",
            str(model_dir),
            "--dataset_name",
            str(pairs),
            "--output_dir",
            str(tmp_path / "rm"),
        ]
    )
    assert (tmp_path / "rm" / "model.safetensors").exists()


def test_dpo_from_the_command_line(workspace):
    tmp_path, config = workspace
    pairs = _pairs(tmp_path)
    main(
        [
            "dpo",
            "--config",
            str(config),
            "--dataset_name",
            str(pairs),
            "--output_dir",
            str(tmp_path / "dpo"),
            "--loss_type",
            "sigmoid",
            "hinge",
            "--loss_weights",
            "1.0",
            "0.5",
            "--beta",
            "0.2",
        ]
    )
    assert (tmp_path / "dpo" / "model.safetensors").exists()
    _, _, dpo = parse("dpo", ["--config", str(config), "--loss_type", "ipo"])
    assert dpo.loss_type == ["ipo"] and dpo.beta == 0.1


# ------------------------------------------------------------------------------- grpo and rejection-sample


REWARD_MODULE = """
def blue(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(t.split().count("blue")) for t in texts]
"""


@pytest.fixture
def rl_workspace(workspace, monkeypatch):
    """The workspace plus a GRPO YAML and an importable module of reward functions (``cli_rewards:blue``)."""
    tmp_path, config = workspace
    (tmp_path / "cli_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cli_rewards", raising=False)
    settings = yaml.safe_load(config.read_text())
    for key in ("max_length", "save_steps"):
        del settings[key]
    settings.update(
        {
            "num_generations": 2,
            "max_completion_length": 6,
            "save_strategy": "no",
            "logging_steps": 1,
            "reward_funcs": ["think_format_reward", "cli_rewards:blue"],
            "reward_weights": [0.5, 1.0],
        }
    )
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text(yaml.safe_dump(settings))
    return tmp_path, config, grpo


def _reward_model(tmp_path):
    from transformers import LlamaForSequenceClassification

    base = tiny_causal_lm()
    path = tmp_path / "reward-model"
    LlamaForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 1})).save_pretrained(
        path
    )
    word_tokenizer().save_pretrained(path)
    return path


def test_grpo_from_yaml_with_builtin_and_custom_rewards(rl_workspace):
    tmp_path, _, grpo = rl_workspace
    script, _, config = parse("grpo", ["--config", str(grpo)])
    assert script.reward_funcs == ["think_format_reward", "cli_rewards:blue"] and config.reward_weights == [0.5, 1.0]
    main(["grpo", "--config", str(grpo), "--output_dir", str(tmp_path / "grpo-out")])
    out = tmp_path / "grpo-out"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_grpo_with_a_reward_model_from_the_command_line(rl_workspace):
    tmp_path, _, grpo = rl_workspace
    reward_model = _reward_model(tmp_path)
    main(
        [
            "grpo",
            "--config",
            str(grpo),
            "--output_dir",
            str(tmp_path / "grpo-rm"),
            "--reward_model_name_or_path",
            str(reward_model),
            "--reward_funcs",
            "cli_rewards.blue",
            "--reward_weights",
            "1.0",
            "0.1",
            "--max_steps",
            "1",
        ]
    )
    assert (tmp_path / "grpo-rm" / "model.safetensors").exists()


def test_distill_from_the_command_line_with_a_wider_teacher(workspace):
    """A narrower student distilled from the workspace's model on its own samples and the data's completions;
    a missing teacher, a prompt-only dataset with lmbda < 1 and a teacher with another tokenizer are refused
    before training, each naming the flag."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp_path, config = workspace
    settings = yaml.safe_load(config.read_text())
    teacher = settings["model_name_or_path"]
    student = tmp_path / "student"
    LlamaForCausalLM(
        LlamaConfig(**{**tiny_causal_lm().config.to_dict(), "hidden_size": 16, "num_hidden_layers": 1})
    ).save_pretrained(student)
    word_tokenizer().save_pretrained(student)
    for key in ("max_length", "save_steps"):
        del settings[key]
    settings.update({"model_name_or_path": str(student), "save_strategy": "no", "max_completion_length": 4})
    distill = tmp_path / "distill.yaml"
    distill.write_text(yaml.safe_dump(settings))
    flags = ["distill", "--config", str(distill), "--teacher_model_name_or_path", teacher, "--lmbda", "0.5"]
    main([*flags, "--beta", "0.5", "--output_dir", str(tmp_path / "distilled")])
    state = json.loads((tmp_path / "distilled" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and "divergence" in state["log_history"][0]
    assert (tmp_path / "distilled" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match="--teacher_model_name_or_path is required"):
        main(["distill", "--config", str(distill)])
    with pytest.raises(SystemExit, match="--teacher_model_name_or_path: "):
        main(["distill", "--config", str(distill), "--teacher_model_name_or_path", str(tmp_path / "nowhere")])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": row["prompt"]}) for row in addition_rows()))
    from fastalign.commands import check_inputs

    parsed = parse("distill", [*flags[1:], "--dataset_name", str(prompts)])
    with pytest.raises(SystemExit, match=r"--lmbda 0.5 trains on the dataset's completions in 50% .* no 'completion'"):
        check_inputs("distill", *parsed)
    other = word_tokenizer()
    other.add_tokens(["extra"])
    other.save_pretrained(teacher)
    with pytest.raises(ValueError, match="tokenizer differs from the student's in 1 tokens"):
        main([*flags, "--output_dir", str(tmp_path / "refused")])


def test_reward_names_and_counts_are_checked_before_any_model_loads(rl_workspace):
    from fastalign.commands import reward_functions_from_names
    from fastalign.rewards import SoftOverlongPunishment, think_format_reward

    _, _, grpo = rl_workspace
    for flags, message in [
        (
            ["--reward_funcs", "blue_reward"],
            "unknown reward function 'blue_reward'; the built-ins are accuracy_reward, "
            "think_format_reward, code_reward, unsandboxed_code_reward, "
            "soft_overlong_punishment",
        ),
        (["--reward_funcs", "soft_overlong_punishment"], "needs --soft_punish_cache"),
        (["--reward_funcs", "no_such_module:f"], "cannot import 'no_such_module'"),
        (["--reward_funcs", "cli_rewards:missing"], "'missing' in module 'cli_rewards' is not found"),
        (["--reward_weights", "1.0"], "1 weights for 2 reward functions"),
        (["--reward_funcs", "./no-rm"], r"^--reward_funcs: the model folder '\./no-rm' does not exist"),
    ]:
        with pytest.raises(SystemExit, match=message):
            main(["grpo", "--config", str(grpo), "--model_name_or_path", "/nonexistent", *flags])
    functions = reward_functions_from_names(["think_format_reward", "soft_overlong_punishment"], 100, 20)
    assert functions[0] is think_format_reward and isinstance(functions[1], SoftOverlongPunishment)
    assert (functions[1].max_completion_length, functions[1].soft_punish_cache) == (100, 20)
    with pytest.raises(SystemExit, match="no reward"):
        main(["rejection-sample", "--model_name_or_path", "/nonexistent", "--output_path", "x.jsonl"])


def test_the_names_that_moved_out_of_cli_still_resolve_with_a_warning():
    from fastalign import cli, commands
    from fastalign.rewards.resolve import BUILTIN_REWARDS

    with pytest.warns(DeprecationWarning, match=r"fastalign.cli.parse moved to fastalign.commands.parse"):
        assert cli.parse is commands.parse
    with pytest.warns(DeprecationWarning, match=r"moved to fastalign.rewards.resolve.BUILTIN_REWARDS"):
        assert cli.BUILTIN_REWARDS is BUILTIN_REWARDS
    with pytest.raises(AttributeError):
        cli.run_sft  # noqa: B018


def test_code_reward_without_a_sandbox_fails_before_any_model_loads(monkeypatch):
    from fastalign.commands import reward_functions_from_names
    from fastalign.rewards import code_reward, sandbox, unsandboxed_code_reward

    assert reward_functions_from_names(["code_reward"], 100) == [code_reward]  # bwrap works here
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    with pytest.raises(SystemExit, match=r"--reward_funcs code_reward: .*apt-get install bubblewrap"):
        reward_functions_from_names(["code_reward"], 100)
    assert reward_functions_from_names(["unsandboxed_code_reward"], 100) == [unsandboxed_code_reward]


def test_rejection_sample_writes_jsonl_that_sft_trains_on(rl_workspace, capsys):
    tmp_path, config, _ = rl_workspace
    data = tmp_path / "train.jsonl"
    output = tmp_path / "sampled" / "r1-sft.jsonl"
    main(
        [
            "rejection-sample",
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--dataset_name",
            str(data),
            "--reward_model_name_or_path",
            str(_reward_model(tmp_path)),
            "--reward_funcs",
            "cli_rewards:blue",
            "think_format_reward",
            "--reward_weights",
            "0.1",
            "1.0",
            "0.5",
            "--num_generations",
            "3",
            "--max_completion_length",
            "6",
            "--batch_size",
            "4",
            "--output_path",
            str(output),
            "--mix_dataset",
            str(data),
            "--mix_ratio",
            "0.25",
            "--disable_tqdm",
            "true",
        ]
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    sampled = [row for row in rows if row["reward"] is not None]
    assert len(sampled) == 10 and len(rows) == 13  # best-of-3 per prompt, then round(10 * 0.25 / 0.75) mixed in
    assert {row["prompt"] for row in sampled} == {row["prompt"] for row in addition_rows()}
    assert all(isinstance(row["completion"], str) for row in rows)
    summary = capsys.readouterr().err
    assert "10 prompts x 3 completions, kept 10 rows (mean reward" in summary and "wrote 13 rows" in summary
    main(["sft", "--config", str(config), "--dataset_name", str(output), "--output_dir", str(tmp_path / "sft-out")])
    assert (tmp_path / "sft-out" / "model.safetensors").exists()


def test_rejection_sample_flags_are_checked():
    with pytest.raises(ValueError, match="needs a threshold"):
        parse("rejection-sample", ["--model_name_or_path", "m", "--keep", "threshold"])
    with pytest.raises(ValueError, match="go together"):
        parse("rejection-sample", ["--model_name_or_path", "m", "--mix_dataset", "chat.jsonl"])
    _, _, args = parse(
        "rejection-sample",
        [
            "--model_name_or_path",
            "m",
            "--keep",
            "threshold",
            "--threshold",
            "0.5",
            "--reward_funcs",
            "accuracy_reward",
            "--num_generations",
            "4",
        ],
    )
    assert (args.keep, args.threshold, args.reward_funcs) == ("threshold", 0.5, ["accuracy_reward"])
    assert args.num_generations == 4


def test_help_lists_grpo_and_rejection_sample():
    top = subprocess.run([sys.executable, "-m", "fastalign", "--help"], capture_output=True, text=True, check=True)
    assert "grpo" in top.stdout and "rejection-sample" in top.stdout
    for command, flags in [
        (
            "grpo",
            (
                "--reward_funcs",
                "--reward_model_name_or_path",
                "--reward_weights",
                "--num_generations",
                "--soft_punish_cache",
            ),
        ),
        ("rejection-sample", ("--keep", "--threshold", "--mix_dataset", "--mix_ratio", "--output_path", "--top_p")),
    ]:
        sub = subprocess.run(
            [sys.executable, "-m", "fastalign", command, "--help"], capture_output=True, text=True, check=True
        )
        for flag in flags:
            assert flag in sub.stdout


# ------------------------------------------------------------------------------------------------------- ppo


def test_ppo_from_yaml_with_a_reward_model_and_a_rule(rl_workspace):
    tmp_path, _, grpo = rl_workspace
    settings = yaml.safe_load(grpo.read_text())
    del settings["max_completion_length"]
    settings.update(
        {
            "reward_model_name_or_path": str(_reward_model(tmp_path)),
            "response_length": 4,
            "num_ppo_epochs": 1,
            "per_device_train_batch_size": 2,
            "output_dir": str(tmp_path / "ppo"),
        }
    )
    ppo = tmp_path / "ppo.yaml"
    ppo.write_text(yaml.safe_dump(settings))
    script, _, config = parse("ppo", ["--config", str(ppo)])
    assert script.reward_funcs == ["think_format_reward", "cli_rewards:blue"] and config.response_length == 4
    with pytest.raises(SystemExit, match="2 weights for 3 reward functions"):
        main(["ppo", "--config", str(ppo), "--model_name_or_path", "/nonexistent"])
    main(
        [
            "ppo",
            "--config",
            str(ppo),
            "--reward_weights",
            "1.0",
            "0.5",
            "0.1",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
        ]
    )
    out = tmp_path / "ppo"
    assert (out / "model.safetensors").exists() and (out / "value_model.safetensors").exists()
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_help_lists_ppo_and_pipeline():
    top = subprocess.run([sys.executable, "-m", "fastalign", "--help"], capture_output=True, text=True, check=True)
    assert "ppo" in top.stdout and "pipeline" in top.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "fastalign", "ppo", "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--reward_funcs",
        "--reward_model_name_or_path",
        "--soft_punish_cache",
        "--response_length",
        "--kl_coef",
        "--num_ppo_epochs",
    ):
        assert flag in sub.stdout
    pipe = subprocess.run(
        [sys.executable, "-m", "fastalign", "pipeline", "--help"], capture_output=True, text=True, check=True
    )
    for text in ("--from_stage", "--smoke", "--set", "rlhf", "r1"):
        assert text in pipe.stdout


# ------------------------------------------------------------------------------------- fast help and errors

PINNED = {"transformers", "accelerate"}


def _pinned_versions() -> dict[str, str]:
    from pathlib import Path

    lines = (Path(__file__).parents[2] / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    return {name: pins[name] for name in PINNED}


def test_the_snapshot_answers_as_the_real_parsers():
    """Where the snapshot is used (its fingerprint matches), every command's help is the real parser's, to the
    character; with the tested versions (constraints.txt) it must be in use, so a flag change without
    `make cli-spec` fails here."""
    import io
    from contextlib import redirect_stdout
    from importlib import metadata

    from fastalign import cli_spec
    from fastalign.commands import COMMANDS, build_parser

    installed = {name: metadata.version(name) for name in PINNED}
    commands = cli_spec.load()
    if installed == _pinned_versions():
        assert commands is not None, "fastalign/cli_spec.json is stale: run `make cli-spec`"
    if commands is None:  # other versions: the real parser answers
        assert cli_spec.fast_parser("sft") is None
        return
    assert set(commands) == set(COMMANDS)
    for name in COMMANDS:
        texts = []
        for parser in (build_parser(name), cli_spec.fast_parser(name)):
            with redirect_stdout(io.StringIO()) as out:
                parser.print_help()
            texts.append(out.getvalue())
        assert texts[0] == texts[1], f"fastalign {name} --help differs from the real parser's"
        assert "--learning_rate" in texts[0] or name == "rejection-sample"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "commands:"),
        (["sft", "--help"], "--per_device_train_batch_size"),
        (["grpo", "--help"], "--reward_funcs"),
        (["dpo", "--model_name_or_path", "m", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["sft", "--model_name_or_path", "m", "--learning_rate", "fast"], "invalid float value: 'fast'"),
        (["sft", "--model_name_or_path", "m", "--eval_strategy", "often"], "invalid choice: 'often'"),
        (["sft", "--model_name_or_path", "m", "--bf16", "maybe"], "Truthy value expected"),
        (["ppo", "--dataset_name", "d"], "--model_name_or_path is required"),
    ],
)
def test_help_and_flag_errors_answer_without_torch(argv, expected):
    """Answered from the snapshot: neither torch nor transformers is imported (they take seconds)."""
    from importlib import metadata

    if {name: metadata.version(name) for name in PINNED} != _pinned_versions():
        pytest.skip("the snapshot matches the tested versions only (constraints.txt); the real parser answers")
    probe = (
        "import sys\nfrom fastalign.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    code = e.code\nelse:\n    code = 0\n"
        "print('loaded', 'torch' in sys.modules, 'transformers' in sys.modules, code, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
    assert "loaded False False" in done.stderr, done.stderr[-2000:]
    assert expected in done.stdout + done.stderr
    assert done.stderr.rstrip().endswith(" 0" if "--help" in argv else " 2")


def test_yaml_errors_answer_from_the_snapshot_too(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: m\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit, match=r"bad.yaml has unknown fields \['learning_rat'\]"):
        main(["sft", "--config", str(config)])
    config.write_text("model_name_or_path: m\nconfig: other.yaml\n")  # not followed: refused
    with pytest.raises(SystemExit, match=r"unknown fields \['config'\]"):
        main(["sft", "--config", str(config)])


def test_the_real_parser_refuses_unknown_flags_with_a_usage_error(capsys):
    """Where the snapshot cannot answer (other library versions), the real parser gives argparse's error too,
    not HfArgumentParser's ValueError traceback."""
    with pytest.raises(SystemExit) as raised:
        parse("sft", ["--model_name_or_path", "m", "--bogus", "1"])
    assert raised.value.code == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err
