"""``fastalign pipeline``: the built-in recipes end to end in smoke mode on a tiny model saved to disk,
placeholders, resuming stage by stage, ``--from_stage`` and the errors a recipe author sees."""

import itertools
import json

import pytest
import yaml
from helpers.tiny import addition_rows, tiny_causal_lm, word_tokenizer

from fastalign.cli import main
from fastalign.commands import build_parser, configs, parse, values_to_argv
from fastalign.pipeline import MARKER, builtin_recipes, load_recipe, plan
from fastalign.pipeline import main as pipeline_main

CPU = [
    "--set",
    "defaults.use_cpu=true",
    "--set",
    "defaults.bf16=false",
    "--set",
    "defaults.gradient_checkpointing=false",
]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    """A tiny model on disk and one small dataset of each kind the recipes read, as ``--set`` values."""
    model_dir = tmp_path / "model"
    tiny_causal_lm().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    rows = addition_rows()[:6]
    answers = [row["completion"].split()[0] for row in rows]
    cot = [
        {"prompt": row["prompt"], "completion": f"<think> one plus {answer} </think> {answer} ."}
        for row, answer in zip(rows, answers, strict=True)
    ]
    reasoning = [{"prompt": row["prompt"], "solution": str(n + 2)} for n, row in enumerate(rows)]
    pairs = [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": " zero ."} for row in rows]
    values = {
        "model_name_or_path": str(model_dir),
        "sft_dataset": _jsonl(tmp_path / "sft.jsonl", rows),
        "cot_dataset": _jsonl(tmp_path / "cot.jsonl", cot),
        "reasoning_prompts": _jsonl(tmp_path / "reasoning.jsonl", reasoning),
        "general_dataset": _jsonl(tmp_path / "general.jsonl", addition_rows()[6:]),
        "preference_dataset": _jsonl(tmp_path / "pairs.jsonl", pairs),
        "prompt_dataset": _jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in rows]),
    }
    return tmp_path, values


def _sets(values, recipe):
    variables = load_recipe(recipe)[0]["variables"]
    return [flag for key, value in values.items() if key in variables for flag in ("--set", f"{key}={value}")]


def _mtime(path):
    return path.stat().st_mtime_ns


def test_builtin_recipes_are_shipped():
    assert {"rlhf", "dpo", "r1"} <= set(builtin_recipes())


def test_rlhf_smoke_resumes_and_reruns_from_a_stage(data, capsys):
    tmp_path, values = data
    out = tmp_path / "rlhf"
    argv = ["rlhf", "--output_dir", str(out), "--smoke", *CPU, *_sets(values, "rlhf")]
    assert pipeline_main(argv) == ["sft", "rm", "ppo"]
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "model.safetensors").exists() and (out / stage / MARKER).exists()
    assert (out / "ppo" / "value_model.safetensors").exists()
    marker = json.loads((out / "ppo" / MARKER).read_text())
    assert marker["command"] == "ppo" and marker["args"]["max_steps"] == 2
    assert marker["args"]["model_name_or_path"] == str(out / "sft")
    assert marker["args"]["reward_model_name_or_path"] == str(out / "rm")
    err = capsys.readouterr().err
    assert "[1/3] sft (sft): running" in err and "[3/3] ppo (ppo): finished" in err

    weights = {stage: _mtime(out / stage / "model.safetensors") for stage in ("sft", "rm", "ppo")}
    assert pipeline_main(argv) == []  # every stage is done: nothing is rewritten
    assert {stage: _mtime(out / stage / "model.safetensors") for stage in weights} == weights
    assert "[2/3] rm (reward): done before, skipped" in capsys.readouterr().err

    assert pipeline_main([*argv, "--from_stage", "rm"]) == ["rm", "ppo"]
    assert _mtime(out / "sft" / "model.safetensors") == weights["sft"]
    assert _mtime(out / "rm" / "model.safetensors") != weights["rm"]
    assert _mtime(out / "ppo" / "model.safetensors") != weights["ppo"]


def test_dpo_smoke_from_the_fastalign_command(data, capsys):
    tmp_path, values = data
    out = tmp_path / "dpo-run"
    main(["pipeline", "dpo", "--output_dir", str(out), "--smoke", *CPU, *_sets(values, "dpo"), "--set", "dpo.beta=0.2"])
    marker = json.loads((out / "dpo" / MARKER).read_text())
    assert marker["args"]["beta"] == 0.2 and marker["args"]["model_name_or_path"] == str(out / "sft")
    assert (out / "dpo" / "model.safetensors").exists()
    assert "all 2 stages done (2 ran, 0 skipped)" in capsys.readouterr().err


def test_r1_smoke(data):
    tmp_path, values = data
    out = tmp_path / "r1"
    ran = pipeline_main(["r1", "--output_dir", str(out), "--smoke", *CPU, *_sets(values, "r1")])
    assert ran == ["cold_start", "reasoning_rl", "rejection", "reasoning_sft", "rm", "final_rl"]
    samples = out / "rejection" / "samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sum(row["reward"] is not None for row in rows) == 6 and len(rows) == 8  # 6 best-of-2 + 2 mixed in
    final = json.loads((out / "final_rl" / MARKER).read_text())["args"]
    assert final["reward_model_name_or_path"] == str(out / "rm")
    assert final["reward_funcs"] == ["accuracy_reward", "think_format_reward"]
    sft = json.loads((out / "reasoning_sft" / MARKER).read_text())["args"]
    assert sft["dataset_name"] == str(samples) and sft["model_name_or_path"] == values["model_name_or_path"]
    assert (out / "final_rl" / "model.safetensors").exists()


def test_r1_distills_into_a_smaller_student_only_when_one_is_given(data, capsys):
    """The r1 recipe's optional last stage: with student_model_name_or_path (here a config-only folder: a random
    init) a narrower model is distilled from final_rl on the rejection-sampled data; without it the stage is left
    out, and setting its fields or referring to it says so."""
    from transformers import LlamaConfig

    tmp_path, values = data
    out = tmp_path / "r1"
    argv = ["r1", "--output_dir", str(out), "--smoke", *CPU, *_sets(values, "r1")]
    sets = [value for flag, value in itertools.pairwise(argv) if flag == "--set"]
    assert "distill" not in [stage.name for stage in plan(load_recipe("r1")[0], "r1", str(out), sets)]
    with pytest.raises(SystemExit, match=r"stage 'distill' is left out .*'student_model_name_or_path' is not set"):
        pipeline_main([*argv, "--set", "distill.lmbda=1.0"])
    student = tmp_path / "student"
    LlamaConfig(**{**tiny_causal_lm().config.to_dict(), "hidden_size": 16, "num_hidden_layers": 1}).save_pretrained(
        student
    )
    word_tokenizer().save_pretrained(student)
    ran = pipeline_main([*argv, "--set", f"student_model_name_or_path={student}"])
    assert ran == ["cold_start", "reasoning_rl", "rejection", "reasoning_sft", "rm", "final_rl", "distill"]
    assert "initialising llama from its config" in capsys.readouterr().err
    args = json.loads((out / "distill" / MARKER).read_text())["args"]
    assert args["teacher_model_name_or_path"] == str(out / "final_rl")
    assert args["dataset_name"] == str(out / "rejection" / "samples.jsonl") and args["lmbda"] == 0.5
    state = json.loads((out / "distill" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("divergence" in entry for entry in state["log_history"])
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "distill").hidden_size == 16


def test_when_names_a_variable(tmp_path, data):
    _, values = data
    recipe = {
        "variables": {"model_name_or_path": values["model_name_or_path"], "extra": None},
        "stages": [
            {"name": "sft", "command": "sft", "args": {"model_name_or_path": "{model_name_or_path}"}},
            {"name": "more", "command": "sft", "when": "extra", "args": {"model_name_or_path": "{extra}"}},
            {"name": "last", "command": "sft", "args": {"model_name_or_path": "{more.output_dir}"}},
        ],
    }
    with pytest.raises(SystemExit, match=r"placeholder \{more.output_dir\}: stage 'more' is left out"):
        plan(recipe, "r", str(tmp_path))
    recipe["stages"][1]["when"] = "nothing"
    with pytest.raises(SystemExit, match="`when: nothing` must name a variable of the recipe"):
        plan(recipe, "r", str(tmp_path))


def test_a_stages_dataclasses_are_those_its_flags_parse_to(data):
    """A stage's args become its command's dataclasses directly (no command line in between); they equal what
    ``fastalign COMMAND`` makes of the same values as flags, text values (YAML 1.1 reads 1e-5 as a string)
    included, for every stage of the built-in recipes."""
    tmp_path, values = data
    for recipe in builtin_recipes():
        sets = [*CPU, *_sets(values, recipe), "--set", "defaults.learning_rate=1e-5"][1::2]
        for stage in plan(*load_recipe(recipe), str(tmp_path / recipe), sets, smoke=True):
            flags = values_to_argv(stage.args, build_parser(stage.command), stage.name)
            assert stage.configs() == parse(stage.command, flags), (recipe, stage.name)
    text = {"model_name_or_path": "m", "learning_rate": "1e-5", "bf16": "false", "report_to": "none", "seed": "3"}
    made = configs("sft", text, "stage 'a'")
    assert made == parse("sft", values_to_argv(text, build_parser("sft"), "x"))
    assert made[2].learning_rate == 1e-5 and made[2].seed == 3 and made[2].bf16 is False


# ------------------------------------------------------------------------------------ resolution and errors


def _recipe(tmp_path, stages, **top):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, **top}))
    return load_recipe(str(path))


def test_placeholders_resolve(tmp_path):
    recipe, name = _recipe(
        tmp_path,
        [
            {"name": "a", "command": "sft", "args": {"model_name_or_path": "{base}", "dataset_name": "{data}"}},
            {
                "name": "b",
                "command": "rejection-sample",
                "args": {"model_name_or_path": "{a.output_dir}", "reward_funcs": "{funcs}"},
            },
            {
                "name": "c",
                "command": "grpo",
                "args": {
                    "model_name_or_path": "{a.output_dir}",
                    "dataset_name": "{b.output_path}",
                    "run_name": "{name}-{a.max_steps}",
                },
            },
        ],
        variables={"base": "m", "data": None, "funcs": ["accuracy_reward"], "name": "run"},
        defaults={"learning_rate": 1e-4, "seed": 3},
    )
    assert name == "recipe"
    with pytest.raises(SystemExit, match=r"variable 'data' is not set; give it with --set data=VALUE"):
        plan(recipe, name, str(tmp_path / "out"))
    a, b, c = plan(recipe, name, str(tmp_path / "out"), ["data=d.jsonl", "c.learning_rate=1e-6"], smoke=True)
    assert a.args["output_dir"] == str(tmp_path / "out" / "a") and a.args["learning_rate"] == 1e-4
    assert b.args["output_path"] == str(tmp_path / "out" / "b" / "samples.jsonl") and b.folder == tmp_path / "out" / "b"
    assert b.args["reward_funcs"] == ["accuracy_reward"] and "learning_rate" not in b.args and b.args["seed"] == 3
    assert c.args["dataset_name"] == b.args["output_path"] and c.args["model_name_or_path"] == a.args["output_dir"]
    assert c.args["learning_rate"] == 1e-6 and c.args["max_steps"] == 2 and c.args["max_completion_length"] == 4
    assert c.args["run_name"] == "run-2"
    (c,) = plan(*_recipe(tmp_path, [{"name": "c", "command": "sft"}]), None, ["c.model_name_or_path={output_dir}/m"])
    assert c.args["model_name_or_path"] == "fastalign-recipe/m" and c.args["output_dir"] == "fastalign-recipe/c"
    with pytest.raises(SystemExit, match=r"unknown placeholder \{a.name\}: stage 'a' has fields"):
        plan(recipe, name, None, ["data=d", "c.run_name={a.name}"])


@pytest.mark.parametrize(
    ("stages", "sets", "message"),
    [
        ([{"name": "a", "command": "train"}], [], "stage 'a' has unknown command 'train'; the commands are"),
        (
            [{"name": "a", "command": "sft", "args": {"model_name_or_path": "{nope}"}}],
            [],
            r"unknown placeholder \{nope\}",
        ),
        (
            [
                {"name": "a", "command": "sft", "args": {"model_name_or_path": "{b.output_dir}"}},
                {"name": "b", "command": "sft"},
            ],
            [],
            r"\{b.output_dir\}: stage 'b' runs at or after this stage",
        ),
        (
            [{"name": "a", "command": "sft", "args": {"model_name_or_path": "{a.output_dir}"}}],
            [],
            "stage 'a' runs at or after this stage",
        ),
        (
            [{"name": "a", "command": "sft", "args": {"model_name_or_path": "{z.output_dir}"}}],
            [],
            "stage 'z' is not a stage of this recipe",
        ),
        ([{"name": "a", "command": "sft", "args": {"learning_rat": 1}}], [], r"unknown fields \['learning_rat'\]"),
        ([{"name": "a", "command": "sft"}, {"name": "a", "command": "dpo"}], [], "two stages are named 'a'"),
        ([{"name": "a.b", "command": "sft"}], [], "needs a `name:`"),
        ([{"name": "a", "command": "sft"}], ["x=1"], "the recipe has no variable 'x'"),
        ([{"name": "a", "command": "sft"}], ["q.max_steps=1"], "no stage named 'q'"),
        ([{"name": "a", "command": "sft"}], ["defaults.num_generationz=1"], "fields of none of the recipe's"),
        ([{"name": "a", "command": "sft"}], ["max_steps"], "is not NAME=VALUE"),
    ],
)
def test_recipe_errors(tmp_path, stages, sets, message):
    recipe, name = _recipe(tmp_path, stages)
    with pytest.raises(SystemExit, match=message):
        plan(recipe, name, str(tmp_path / "out"), sets)


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="neither a file nor a built-in recipe"):
        main(["pipeline", "r2"])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stage": []}))
    with pytest.raises(SystemExit, match="non-empty `stages:` list"):
        main(["pipeline", str(path)])
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "command": "sft"}], "stepz": 1}))
    with pytest.raises(SystemExit, match=r"unknown top-level keys \['stepz'\]"):
        main(["pipeline", str(path)])
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "command": "sft", "args": {"model_name_or_path": "m"}}]}))
    with pytest.raises(SystemExit, match="--from_stage 'b': no such stage"):
        main(["pipeline", str(path), "--from_stage", "b", "--output_dir", str(tmp_path / "o")])
    main(["pipeline", str(path), "--dry_run", "--output_dir", str(tmp_path / "o")])
    assert yaml.safe_load(capsys.readouterr().out)[0]["args"]["output_dir"] == str(tmp_path / "o" / "a")
    assert not (tmp_path / "o").exists()
