"""``fastalign pipeline``: run a recipe of ``fastalign`` commands one after the other, resumable stage by stage.

A recipe is a YAML file (or the name of a built-in one in ``fastalign/recipes/``: ``rlhf``, ``dpo``, ``r1``)::

    variables:              # values the user sets with --set NAME=VALUE; null: required when used
      model_name_or_path: null
      sft_dataset: null
    defaults:               # merged into every stage's args (each stage takes the fields its command knows)
      learning_rate: 1.0e-5
    stages:
      - name: sft           # a stage name: letters, digits, _ and -
        command: sft        # a fastalign command (sft, reward, dpo, grpo, ppo, distill, rejection-sample, pretrain)
        args:               # the command's fields, as in its --config YAML
          model_name_or_path: "{model_name_or_path}"
          dataset_name: "{sft_dataset}"
      - name: ppo
        command: ppo
        args:
          model_name_or_path: "{sft.output_dir}"   # an earlier stage's resolved field

A stage with ``when: NAME`` runs only when variable ``NAME`` is set (an optional stage: the r1 recipe's
``distill`` runs when ``student_model_name_or_path`` is given).

``{NAME}`` is a variable (``{output_dir}`` is the pipeline's folder); ``{STAGE.FIELD}`` is a field of an earlier
stage's resolved args (``output_dir``, ``output_path``, ...). A string that is a single placeholder takes the
value's type (lists stay lists). Each stage writes to ``<output_dir>/<stage name>`` unless its args say otherwise
(``rejection-sample`` writes ``<output_dir>/<stage name>/samples.jsonl``); after it succeeds, the folder gets
``fastalign_stage_done.json`` (the resolved args) and a re-run skips the stage. ``--from_stage NAME`` re-runs
from that stage on; a stage that runs makes every later stage run too.

Precedence, lowest first: ``defaults``, the stage's ``args``, ``--smoke``, ``--set STAGE.FIELD=VALUE``.
``--set defaults.FIELD=VALUE`` adds to ``defaults``. Everything is checked (commands, fields, placeholders)
before the first stage runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fastalign import commands

MARKER = "fastalign_stage_done.json"
"""The file a stage's folder gets once the stage has finished: its name, command and resolved args."""

SMOKE: dict[str, Any] = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "num_generations": 2,
    "max_completion_length": 4,
    "response_length": 4,
    "max_prompt_length": 32,
    "max_length": 64,
    "num_ppo_epochs": 1,
    "num_mini_batches": 1,
    "local_rollout_forward_batch_size": 4,
    "batch_size": 2,
    "keep": "best",
    "threshold": None,
    "skip_truncated": False,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 1,
    "report_to": "none",
    "disable_tqdm": True,
}
"""What ``--smoke`` sets in every stage (the fields its command knows): 2 steps, tiny batches, short lengths;
rejection sampling keeps each prompt's best completion whatever its reward (an untrained model's completions would
all fail a threshold, leaving the next stage no data)."""

_NAME = re.compile(r"^[A-Za-z_][\w-]*$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w-]*)(?:\.([A-Za-z_]\w*))?\}")


def builtin_recipes() -> list[str]:
    """The names of the recipes shipped in ``fastalign/recipes/``."""
    folder = resources.files("fastalign") / "recipes"
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_recipe(recipe: str) -> tuple[dict[str, Any], str]:
    """The recipe's mapping and its name: a YAML file, or a built-in recipe's name (``r1``)."""
    path = Path(recipe)
    if path.is_file():
        text, name = path.read_text(), path.stem
    elif recipe in builtin_recipes():
        text, name = (resources.files("fastalign") / "recipes" / f"{recipe}.yaml").read_text(), recipe
    else:
        raise SystemExit(
            f"fastalign pipeline: {recipe!r} is neither a file nor a built-in recipe ({', '.join(builtin_recipes())})"
        )
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict) or not isinstance(values.get("stages"), list) or not values["stages"]:
        raise SystemExit(f"fastalign pipeline: recipe {recipe!r} must be a mapping with a non-empty `stages:` list")
    unknown = sorted(set(values) - {"variables", "defaults", "stages", "output_dir", "description"})
    if unknown:
        raise SystemExit(
            f"fastalign pipeline: recipe {recipe!r} has unknown top-level keys {unknown} (known: "
            "variables, defaults, stages, output_dir, description)"
        )
    return values, name


@dataclass
class Stage:
    name: str
    command: str
    args: dict[str, Any]
    folder: Path

    @property
    def marker(self) -> Path:
        return self.folder / MARKER

    def record(self) -> dict[str, Any]:
        return {"stage": self.name, "command": self.command, "args": self.args}

    def configs(self) -> tuple[Any, Any, Any]:
        """The command's dataclasses (script arguments, ``ModelConfig``, config) made from :attr:`args`."""
        return commands.configs(self.command, self.args, f"stage {self.name!r}")


def _parse_sets(sets: Sequence[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in sets:
        key, equals, raw = item.partition("=")
        if not equals or not key:
            raise SystemExit(f"fastalign pipeline: --set {item!r} is not NAME=VALUE")
        # YAML would read "{stage.output_dir}" as a mapping: a value with a placeholder stays a string
        value = raw if not raw or _PLACEHOLDER.search(raw) else yaml.safe_load(raw)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-5 (no dot) as a string
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        parsed.append((key.strip(), value))
    return parsed


def _substitute(value: Any, lookup, where: str) -> Any:
    """``value`` with its placeholders replaced (recursing into lists and mappings)."""
    if isinstance(value, list):
        return [_substitute(item, lookup, where) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, lookup, where) for key, item in value.items()}
    if not isinstance(value, str):
        return value
    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        return lookup(whole.group(1), whole.group(2), where)
    return _PLACEHOLDER.sub(lambda match: str(lookup(match.group(1), match.group(2), where)), value)


def plan(
    recipe: dict[str, Any],
    recipe_name: str,
    output_dir: str | None = None,
    sets: Sequence[str] = (),
    smoke: bool = False,
) -> list[Stage]:
    """The recipe's stages with every arg resolved; raises ``SystemExit`` on the first problem."""
    root = Path(output_dir or recipe.get("output_dir") or f"fastalign-{recipe_name}")
    variables = dict(recipe.get("variables") or {})
    defaults = dict(recipe.get("defaults") or {})
    stage_sets: dict[str, dict[str, Any]] = {}
    specs = recipe["stages"]
    names = [spec.get("name") if isinstance(spec, dict) else None for spec in specs]
    for index, (spec, name) in enumerate(zip(specs, names, strict=True)):
        if not isinstance(spec, dict) or not isinstance(name, str) or not _NAME.match(name):
            raise SystemExit(f"fastalign pipeline: stage {index + 1} needs a `name:` of letters, digits, _ and -")
        if names.count(name) > 1:
            raise SystemExit(f"fastalign pipeline: two stages are named {name!r}")
        unknown = sorted(set(spec) - {"name", "command", "args", "when"})
        if unknown:
            raise SystemExit(
                f"fastalign pipeline: stage {name!r} has unknown keys {unknown} (name, command, args, when)"
            )
        if spec.get("command") not in commands.COMMANDS:
            raise SystemExit(
                f"fastalign pipeline: stage {name!r} has unknown command {spec.get('command')!r}; "
                f"the commands are {', '.join(commands.COMMANDS)}"
            )
    for key, value in _parse_sets(sets):
        scope, dot, field_name = key.partition(".")
        if not dot:
            if key not in variables:
                listed = ", ".join(variables) or "none"
                raise SystemExit(
                    f"fastalign pipeline: --set {key}: the recipe has no variable {key!r} (its variables: {listed}); "
                    "use STAGE.FIELD or defaults.FIELD for args"
                )
            variables[key] = value
        elif scope == "defaults":
            defaults[field_name] = value
        elif scope in names:
            stage_sets.setdefault(scope, {})[field_name] = value
        else:
            raise SystemExit(f"fastalign pipeline: --set {key}: no stage named {scope!r} (stages: {', '.join(names)})")
    variables.setdefault("output_dir", str(root))
    for spec in specs:
        when = spec.get("when")
        if when is not None and (not isinstance(when, str) or when not in variables):
            raise SystemExit(
                f"fastalign pipeline: stage {spec['name']!r}: `when: {when}` must name a variable of the recipe "
                f"({', '.join(variables)})"
            )
    skipped = {spec["name"] for spec in specs if spec.get("when") is not None and variables[spec["when"]] is None}
    if skipped & set(stage_sets):
        name = sorted(skipped & set(stage_sets))[0]
        raise SystemExit(
            f"fastalign pipeline: --set {name}.…: stage {name!r} is left out (its `when:` variable "
            f"{next(s['when'] for s in specs if s['name'] == name)!r} is not set)"
        )
    specs = [spec for spec in specs if spec["name"] not in skipped]
    fields = {spec["command"]: commands.field_names(spec["command"]) for spec in specs}
    known_anywhere = set().union(*fields.values())
    stray = sorted(set(defaults) - known_anywhere)
    if stray:
        raise SystemExit(f"fastalign pipeline: defaults {stray} are fields of none of the recipe's commands")

    stages: list[Stage] = []
    for spec in specs:
        name, command = spec["name"], spec["command"]
        known = fields[command]
        args = {key: value for key, value in defaults.items() if key in known}
        args.update(spec.get("args") or {})
        if smoke:
            args.update({key: value for key, value in SMOKE.items() if key in known})
        args.update(stage_sets.get(name, {}))
        unknown = sorted(set(args) - known)
        if unknown:
            raise SystemExit(
                f"fastalign pipeline: stage {name!r} ({command}) has unknown fields {unknown}; see "
                f"`fastalign {command} --help`"
            )
        done = {stage.name: stage for stage in stages}

        def lookup(head: str, field_name: str | None, where: str, done=done, name=name) -> Any:
            if field_name is None:
                if head not in variables:
                    raise SystemExit(
                        f"fastalign pipeline: {where}: unknown placeholder {{{head}}} (variables: "
                        f"{', '.join(variables)}; an earlier stage's field is {{STAGE.FIELD}})"
                    )
                if variables[head] is None:
                    raise SystemExit(
                        f"fastalign pipeline: {where}: variable {head!r} is not set; give it with --set {head}=VALUE"
                    )
                return variables[head]
            if head not in done:
                later = head in names and head not in skipped
                reason = "runs at or after this stage" if later else "is not a stage of this recipe"
                if head in skipped:
                    reason = "is left out (its `when:` variable is not set)"
                raise SystemExit(
                    f"fastalign pipeline: {where}: placeholder {{{head}.{field_name}}}: stage {head!r} "
                    f"{reason}; a placeholder can refer to earlier stages only"
                )
            if field_name not in done[head].args:
                raise SystemExit(
                    f"fastalign pipeline: {where}: unknown placeholder {{{head}.{field_name}}}: stage "
                    f"{head!r} has fields {sorted(done[head].args)}"
                )
            return done[head].args[field_name]

        args = {key: _substitute(value, lookup, f"stage {name!r}, field {key!r}") for key, value in args.items()}
        if "output_dir" in known:
            args.setdefault("output_dir", str(root / name))
            folder = Path(args["output_dir"])
        elif "output_path" in known:
            args.setdefault("output_path", str(root / name / "samples.jsonl"))
            folder = Path(args["output_path"]).parent
        else:  # pragma: no cover - every command writes an output_dir or an output_path
            folder = root / name
        stages.append(Stage(name, command, args, folder))
    return stages


def _progress(message: str) -> None:
    print(f"fastalign pipeline: {message}", file=sys.stderr, flush=True)


def _free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stages_to_run(stages: list[Stage], from_stage: str | None) -> list[bool]:
    """Which stages run: those not finished before, ``from_stage`` on, and every stage after one that runs (the
    later stages read its output)."""
    forced, runs = False, []
    for stage in stages:
        forced = forced or stage.name == from_stage or not stage.marker.exists()
        runs.append(forced)
    return runs


def _written_by(path: str, stages: list[Stage]) -> bool:
    """Whether ``path`` is (inside) the output of one of ``stages``."""
    target = Path(str(path)).expanduser().resolve()
    for stage in stages:
        outputs = {
            stage.folder,
            *(Path(str(stage.args[key])) for key in ("output_dir", "output_path") if key in stage.args),
        }
        for output in outputs:
            output = output.expanduser().resolve()
            if target == output or output in target.parents:
                return True
    return False


def check_stage_inputs(stages: list[Stage], runs: Sequence[bool]) -> None:
    """Before the first stage runs, check the inputs of every stage that will run
    (:func:`fastalign.commands.check_inputs`: model folders, datasets and their formats, held-out splits, the mix
    dataset), except those an earlier stage writes: a missing or malformed dataset of the last stage fails now,
    not hours later."""
    for index, (stage, run) in enumerate(zip(stages, runs, strict=True)):
        if not run:
            continue
        script, model_args, config = stage.configs()
        try:
            written = stages[:index]
            commands.check_inputs(
                stage.command, script, model_args, config, lambda path, w=written: _written_by(path, w)
            )
        except SystemExit as error:
            raise SystemExit(f"fastalign pipeline: stage {stage.name!r} ({stage.command}): {error}") from None


def run_pipeline(
    stages: list[Stage],
    from_stage: str | None = None,
    on_stage_done: Callable[[Stage, bool], None] | None = None,
) -> list[str]:
    """Runs the planned stages in order (skipping finished ones); returns the names of the stages that ran.

    ``on_stage_done(stage, ran)``, when given, is called after each stage, finished now (``ran``) or before.
    """
    names = [stage.name for stage in stages]
    if from_stage is not None and from_stage not in names:
        raise SystemExit(f"fastalign pipeline: --from_stage {from_stage!r}: no such stage (stages: {', '.join(names)})")
    runs = _stages_to_run(stages, from_stage)
    check_stage_inputs(stages, runs)
    ran: list[str] = []
    for index, stage in enumerate(stages, start=1):
        label = f"[{index}/{len(stages)}] {stage.name} ({stage.command})"
        if not runs[index - 1]:
            previous = json.loads(stage.marker.read_text()).get("args")
            changed = "" if previous == stage.args else "; its args changed since: re-run it with --from_stage"
            _progress(f"{label}: done before, skipped ({stage.marker}){changed}")
            if on_stage_done is not None:
                on_stage_done(stage, False)
            continue
        stage.marker.unlink(missing_ok=True)
        _progress(f"{label}: running -> {stage.folder}")
        start = time.perf_counter()
        script, model_args, config = stage.configs()
        commands.run(stage.command, script, model_args, config)
        del script, model_args, config
        _free_memory()
        stage.folder.mkdir(parents=True, exist_ok=True)
        stage.marker.write_text(json.dumps(stage.record(), indent=2, default=str) + "\n")
        _progress(f"{label}: finished in {time.perf_counter() - start:.1f}s")
        ran.append(stage.name)
        if on_stage_done is not None:
            on_stage_done(stage, True)
    _progress(f"all {len(stages)} stages done ({len(ran)} ran, {len(stages) - len(ran)} skipped)")
    return ran


def pipeline_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastalign pipeline",
        description="Run a recipe of fastalign commands stage by stage; finished stages are skipped on a re-run.",
        epilog=f"built-in recipes: {', '.join(builtin_recipes())} (fastalign/recipes/*.yaml; copy one to edit it). "
        "Recipe format: see the fastalign.pipeline module docstring.",
    )
    parser.add_argument("recipe", help="a recipe YAML file or a built-in recipe's name")
    parser.add_argument("--output_dir", help="the pipeline's folder; stage NAME writes to OUTPUT_DIR/NAME")
    parser.add_argument("--from_stage", help="re-run this stage and every later one, even if finished")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a variable (NAME=VALUE), a default of every stage (defaults.FIELD=VALUE) or one stage's field "
        "(STAGE.FIELD=VALUE); VALUE is YAML (1e-5, true, [a, b]); repeatable",
    )
    parser.add_argument("--smoke", action="store_true", help="every stage: max_steps 2, tiny batches, short lengths")
    parser.add_argument("--dry_run", action="store_true", help="print the resolved stages and run nothing")
    return parser


def main(argv: Sequence[str]) -> list[str]:
    options = pipeline_parser().parse_args(list(argv))
    recipe, name = load_recipe(options.recipe)
    stages = plan(recipe, name, options.output_dir, options.set, options.smoke)
    if options.dry_run:
        print(yaml.safe_dump([stage.record() for stage in stages], sort_keys=False))
        return []
    return run_pipeline(stages, options.from_stage)
