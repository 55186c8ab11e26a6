"""Build script for the native part of fastalign; ``pyproject.toml`` holds the package metadata.

With ``nvcc`` available (``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH`` or ``/usr/local/cuda/bin``) the CUDA
C++ kernels in ``csrc/`` are compiled through ninja into ``fastalign._C``, plus ``fastalign._host_math``: the
kernels' shared ``__host__ __device__`` math compiled for the CPU, which the tests check against torch. Neither
module links against torch (raw pointers and the CUDA stream cross the boundary), so one build serves any torch
version. Without nvcc the install is pure Python.

Environment:
    FASTALIGN_BUILD_CUDA   unset/"auto": build when nvcc is found; "0": never; "1": required (fail without nvcc).
    FASTALIGN_CUDA_ARCHS   compute capabilities, e.g. "80;90" (default) or "8.0 9.0+PTX"; the newest one also
                           gets PTX so that newer GPUs can JIT-compile it.
    MAX_JOBS               parallel compile jobs (default: ninja's choice).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90"


def build_mode() -> str:
    mode = os.environ.get("FASTALIGN_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTALIGN_BUILD_CUDA must be 0, 1 or auto; got {mode!r}")
    return mode


def find_nvcc() -> Path | None:
    candidates = [Path(os.environ[var]) / "bin" / "nvcc" for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((path for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


def parse_archs(spec: str) -> tuple[list[str], str]:
    """``"80;90"`` / ``"8.0 9.0+PTX"`` / ``"sm_80,sm_90"`` -> (``["80", "90"]``, PTX arch = the newest)."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        digits = item.removesuffix("+PTX").removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", digits):
            raise SystemExit(f"FASTALIGN_CUDA_ARCHS: cannot read {item!r}; expected e.g. '80;90' or '8.0 9.0'")
        if digits not in archs:
            archs.append(digits)
    if not archs:
        raise SystemExit("FASTALIGN_CUDA_ARCHS is empty; expected e.g. '80;90'")
    return archs, max(archs, key=lambda arch: int(re.sub(r"\D", "", arch)))


def gencode_flags(archs: list[str], ptx_arch: str) -> list[str]:
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    flags.append(f"-gencode=arch=compute_{ptx_arch},code=compute_{ptx_arch}")
    return flags


def ninja_binary() -> str:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
    except ImportError:
        raise SystemExit("building fastalign's CUDA kernels needs ninja: pip install ninja") from None
    return str(Path(ninja.BIN_DIR) / "ninja")


def pybind11_include() -> str:
    try:
        import pybind11
    except ImportError:
        raise SystemExit("building fastalign's CUDA kernels needs pybind11: pip install pybind11") from None
    return pybind11.get_include()


class NativeExtension(Extension):
    """An extension compiled by the ninja file that :class:`BuildNative` writes (``kind``: "cuda" or "host")."""

    def __init__(self, name: str, kind: str, sources: list[Path]):
        super().__init__(name, sources=[str(path.relative_to(ROOT)) for path in sources])
        self.kind = kind


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class BuildNative(build_ext):
    """Compile every native extension in one ninja run (parallel), then place each library where setuptools
    expects it (the package folder for editable installs)."""

    def build_extensions(self) -> None:
        nvcc = find_nvcc()
        archs, ptx_arch = parse_archs(os.environ.get("FASTALIGN_CUDA_ARCHS", DEFAULT_ARCHS))
        build_dir = Path(self.build_temp).resolve() / "fastalign-native"
        build_dir.mkdir(parents=True, exist_ok=True)
        includes = [str(CSRC / "include"), sysconfig.get_paths()["include"], pybind11_include()]
        cxx = os.environ.get("CXX", "c++")
        cxx_flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", *(f"-I{i}" for i in includes)]
        # The build's targets as cuobjdump names them, for fastalign._C.build_info().
        targets = ",".join([*(f"sm_{arch}" for arch in archs), f"compute_{ptx_arch}"])
        define_archs = f"'-DFASTALIGN_CUDA_ARCHS=\"{targets}\"'"
        gencode = " ".join(gencode_flags(archs, ptx_arch))
        nvcc_flags = [
            "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "--threads", "2",
            "-lineinfo", f"-I{CSRC / 'include'}", gencode,
        ]  # fmt: skip
        lines = [
            "ninja_required_version = 1.3",
            f"cxx_flags = {' '.join(cxx_flags)} {define_archs}",
            f"nvcc_flags = {' '.join(nvcc_flags)}",
            f"rule cxx\n  command = {cxx} $cxx_flags -MMD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
            f"rule nvcc\n  command = {nvcc} $nvcc_flags -MD -MF $out.d -c $in -o $out\n  depfile = $out.d\n"
            "  deps = gcc",
            f"rule link_cuda\n  command = {nvcc} -shared -cudart static {gencode} $in -o $out",
            f"rule link_host\n  command = {cxx} -shared $in -o $out",
        ]
        outputs = {}
        for ext in self.extensions:
            objects = []
            for source in ext.sources:
                obj = build_dir / (source.replace("/", "_") + ".o")
                rule = "nvcc" if source.endswith(".cu") else "cxx"
                lines.append(f"build {_ninja_escape(str(obj))}: {rule} {_ninja_escape(str(ROOT / source))}")
                objects.append(_ninja_escape(str(obj)))
            library = build_dir / Path(self.get_ext_filename(ext.name)).name
            lines.append(f"build {_ninja_escape(str(library))}: link_{ext.kind} {' '.join(objects)}")
            outputs[ext.name] = library
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        command = [ninja_binary(), "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            command += ["-j", os.environ["MAX_JOBS"]]
        print(f"fastalign: building the CUDA kernels with {nvcc} for sm_{', sm_'.join(archs)} (+PTX {ptx_arch})")
        subprocess.run(command, check=True)
        for name, library in outputs.items():
            target = Path(self.get_ext_fullpath(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(library, target)


def native_extensions() -> list[Extension]:
    mode = build_mode()
    if mode == "0":
        return []
    if find_nvcc() is None:
        if mode == "1":
            raise SystemExit(
                "FASTALIGN_BUILD_CUDA=1 but nvcc was not found in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH or "
                "/usr/local/cuda/bin; install the CUDA toolkit or set CUDA_HOME"
            )
        print("fastalign: nvcc not found; installing without the CUDA kernels (pure Python)", file=sys.stderr)
        return []
    cuda_sources = sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "bindings").glob("*.cpp"))
    return [
        NativeExtension("fastalign._C", "cuda", cuda_sources),
        NativeExtension("fastalign._host_math", "host", sorted((CSRC / "host").glob("*.cpp"))),
    ]


# setuptools runs this file as __main__; tests import it for its helpers.
if __name__ == "__main__":
    setup(ext_modules=native_extensions(), cmdclass={"build_ext": BuildNative})
