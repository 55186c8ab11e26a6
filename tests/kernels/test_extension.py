"""The native build: setup.py's configuration, fastalign._C importing on a machine with nvcc, and the
architectures inside the library (read back with cuobjdump)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastalign

ROOT = Path(__file__).resolve().parents[2]


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastalign_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


setup_py = _load_setup()


def test_default_architectures_are_sm80_sm90_with_ptx():
    archs, ptx = setup_py.parse_archs(setup_py.DEFAULT_ARCHS)
    assert (archs, ptx) == (["80", "90"], "90")
    assert setup_py.gencode_flags(archs, ptx) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("8.0 9.0+PTX", (["80", "90"], "90")), ("sm_90a,sm_80", (["90a", "80"], "90a")), ("120", (["120"], "120"))],
)
def test_architecture_spellings(spec, expected):
    assert setup_py.parse_archs(spec) == expected


@pytest.mark.parametrize("spec", ["", "hopper", "9"])
def test_bad_architectures_fail_loudly(spec):
    with pytest.raises(SystemExit, match="FASTALIGN_CUDA_ARCHS"):
        setup_py.parse_archs(spec)


def test_build_modes(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BUILD_CUDA", "0")
    assert setup_py.native_extensions() == []
    monkeypatch.setenv("FASTALIGN_BUILD_CUDA", "1")
    monkeypatch.setattr(setup_py, "find_nvcc", lambda: None)
    with pytest.raises(SystemExit, match="FASTALIGN_BUILD_CUDA=1 but nvcc was not found"):
        setup_py.native_extensions()
    monkeypatch.setenv("FASTALIGN_BUILD_CUDA", "auto")
    assert setup_py.native_extensions() == []  # no nvcc: a pure-Python install
    monkeypatch.setenv("FASTALIGN_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be 0, 1 or auto"):
        setup_py.build_mode()


def test_nvcc_is_found_through_cuda_home(monkeypatch, tmp_path):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup_py.find_nvcc() == nvcc


# On a machine with nvcc, an install that did not opt out must have built the extension.
EXPECT_EXTENSION = setup_py.find_nvcc() is not None and os.environ.get("FASTALIGN_BUILD_CUDA", "auto") != "0"


@pytest.mark.skipif(not EXPECT_EXTENSION, reason="no nvcc on this machine: the install is pure Python")
def test_extension_is_built_and_imports():
    from fastalign import _C, _host_math

    info = _C.build_info()
    assert info["cuda_runtime"] >= 11080
    assert {"logprobs_forward", "logprobs_backward", "set_device", "device_count"} <= set(dir(_C))
    assert _host_math.__doc__
    count, why = _C.device_count()
    status = fastalign.backends()["cuda"]
    assert status.available == (count > 0)
    if count == 0:
        assert why and why in status.reason


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    # The nvidia-cuda-cuobjdump wheel (a dev dependency) puts the binary under nvidia/cu*/bin.
    candidates = sorted(Path(sys.prefix).glob("lib/python*/site-packages/nvidia/cu*/bin/cuobjdump"))
    return str(candidates[-1]) if candidates else None


@pytest.mark.skipif(not EXPECT_EXTENSION, reason="no nvcc on this machine: the install is pure Python")
def test_library_holds_the_requested_architectures():
    from fastalign import _C

    tool = _cuobjdump()
    assert tool, "cuobjdump not found: pip install nvidia-cuda-cuobjdump (part of fastalign[dev] on Linux)"
    library = _C.__file__
    elf = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    requested = _C.build_info()["archs"].split(",")
    for target in requested:
        kind, arch = target.split("_")
        listing = elf if kind == "sm" else ptx
        kernels = re.findall(rf"(\w+)\.sm_{arch}\.(?:cubin|ptx)", listing)
        assert "logprobs" in kernels, f"{target}: no logprobs code in\n{listing}"
    assert set(re.findall(r"\.(sm_\d+a?)\.cubin", elf)) == {t for t in requested if t.startswith("sm_")}
