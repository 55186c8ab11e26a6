"""The CUDA kernels' index arithmetic, compiled for the host from the kernels' own header.

``csrc/tests/index_check.cpp`` includes ``csrc/include/fastalign/row_split.h`` (the head / vector / tail split,
the backward's access width and column chunks, the row splits of the policy and DPO forwards, the DPO backward's
flat row estimate) and replays every launcher's loops over every thread: for V from 1 to 300 and the real
vocabularies, every misalignment of the logits and of the gradient, every block size and split count the
launchers use, each element must be read and written exactly once and every vector access must be aligned to its
width and inside its row.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "tests" / "index_check.cpp"

CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_every_element_is_touched_once_by_aligned_accesses_inside_its_row(tmp_path):
    binary = tmp_path / "index_check"
    build = subprocess.run(
        [CXX, "-O2", "-std=c++17", "-Wall", "-Werror", f"-I{ROOT / 'csrc' / 'include'}", str(SOURCE), "-o",
         str(binary)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    *_, summary = done.stdout.strip().splitlines()
    cases, failures = int(summary.split()[1]), int(summary.split()[3])
    assert failures == 0 and cases > 100_000, summary
