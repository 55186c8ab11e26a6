"""bench/gpu_check.sh cannot rot: its syntax (and shellcheck where installed), its budgets against the limits a
lent GPU gives, and the core mode's rehearsal on the CPU end to end (without the build, which reinstalls)."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cases import PEER_MODULES

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
GRACE = 5  # the script's grace after a step's timeout
LIMITS = {"core": 480, "rest": 600}  # seconds: 8 minutes, and the device tool's 10 minutes a command
STEPS = {
    "core": ["env", "peers", "build", "tests", "bench"],
    "rest": ["env", "peers", "build", "suite", "sanitize", "bench"],
}


def test_script_parses_and_is_shellcheck_clean():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def budgets(text: str) -> dict[str, dict[str, int]]:
    """Each mode's step budgets, read from the script's ``declare -A budget=(...)`` and its rest-mode change."""
    table = {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A budget=\((.*)\)", text)[1])}
    rest_bench = int(re.search(r"\$mode == rest \]\] && budget\[bench\]=(\d+)", text)[1])
    return {
        mode: {step: rest_bench if (mode, step) == ("rest", "bench") else table[step] for step in STEPS[mode]}
        for mode in STEPS
    }


@pytest.mark.parametrize("mode", ["core", "rest"])
def test_budgets_fit_the_mode_limit(mode):
    """Every step's timeout plus its grace, summed, ends the mode within its limit."""
    text = SCRIPT.read_text()
    assert f"grace={GRACE}" in text
    steps = budgets(text)[mode]
    assert sum(steps.values()) + GRACE * len(steps) <= LIMITS[mode], steps


def test_bad_arguments_are_refused_with_the_usage():
    for args, env in ((["/tmp/x", "everything"], {}), ([], {}), (["/tmp/x"], {"FASTALIGN_CHECK_DEVICE": "gpu"})):
        done = subprocess.run(
            ["bash", str(SCRIPT), *args], capture_output=True, text=True, env={**os.environ, **env}, check=False
        )
        assert done.returncode == 2 and ("usage" in done.stderr or "FASTALIGN_CHECK_DEVICE" in done.stderr)


@pytest.mark.slow
def test_core_mode_rehearses_on_the_cpu(tmp_path):
    """FASTALIGN_CHECK_DEVICE=cpu: environment, core tests (Triton interpreting, toy shapes) and the core benchmark
    (`--rehearse`) run, and each writes its log, the summary its line, the benchmark its tables; at most 8 files."""
    # The tests step's budget is the GPU's (test_budgets_fit_the_mode_limit holds it to the limit); Triton's
    # interpreter on a shared 2-core CPU takes ~140 s of it for the same cases, so the rehearsal doubles it.
    env = {**os.environ, "FASTALIGN_CHECK_DEVICE": "cpu", "GPU_CHECK_SKIP": "build", "PYTHON": sys.executable,
           "GPU_CHECK_SECONDS_TESTS": "300"}  # fmt: skip
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path), "core"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines()[2:]}
    assert status["env"] == status["tests"] == status["bench"] == status["total"] == "ok", summary
    assert status["build"] == "skipped" and status["peers"] in ("ok", "skipped"), summary
    assert re.search(r"\d+ passed", (tmp_path / "tests.log").read_text())
    with open(tmp_path / "core_ops-gpu-core-rehearsal.csv") as handle:
        rows = list(csv.DictReader(handle))
    cases = {(r["op"], r["mode"], r["impl"]) for r in rows}
    linear_impls = ("eager", "fastalign-triton", "fastalign-tiles", "lm-head-matmuls")
    for op in ("linear_logprobs", "linear_cross_entropy"):
        assert {(op, "fwd+bwd", impl) for impl in linear_impls} <= cases
    assert ("logprobs_from_logits", "fwd", "fastalign-triton") in cases
    # Only a peer's kernel that triton's interpreter cannot run may fail (cut-cross-entropy's, when carried).
    errors = [r for r in rows if r["error"] and not (r["impl"] in PEER_MODULES and r["error"].startswith("Interp"))]
    assert not errors, errors
    assert len(list(tmp_path.iterdir())) <= 8
