"""Code reward: run the completion's Python program against the row's tests in a separate, limited process.

What is guaranteed, and what is not
-----------------------------------
Each program runs in its own ``python -I`` process (isolated mode: no ``PYTHON*`` variables, no user site
directory, no script directory on ``sys.path``) with a fresh temporary directory as its working directory, an
environment holding only ``PATH``/``LANG`` (so no proxy variables and no credentials inherited from the
trainer), its own session (the whole process group is killed on timeout), and these limits, set with
``resource.setrlimit`` (soft = hard, so the program cannot raise them) by the runner *before* any untrusted
code runs:

- ``RLIMIT_CPU``: CPU seconds; ``RLIMIT_AS``: address space (``memory_mb``); ``RLIMIT_FSIZE``: size of any file
  written; ``RLIMIT_CORE`` = 0; plus a wall-clock ``timeout`` enforced by the parent.

The limits are set in the child rather than in a ``preexec_fn``: ``subprocess`` documents ``preexec_fn`` as
unsafe in a process with threads (a trainer has several), and the runner sets them before it reads the program.

Network: the runner replaces ``socket.socket``, ``socket.create_connection``, ``socket.getaddrinfo`` and
``socket.socketpair`` (and hides ``_socket``) with functions raising ``OSError`` before the program runs. This
stops ordinary network use (``urllib``, ``requests``, ``socket``); it is **not** a security sandbox: a program
that deliberately goes around Python (``ctypes``, ``os.system`` of another binary) can still reach the network
and the file system with the trainer user's rights, and a program written to attack the harness could forge its
result file. Run untrusted policies in a container / VM without network if that matters.

Reward
------
The fraction of tests that pass (open-r1's / TRL-style pass rate): ``tests`` is a list of statements (e.g.
``assert f(1) == 2``), each run after the program in its namespace, one test = one statement; a single string
of test code counts as one test (1.0 or 0.0). A program that fails to compile or raises at import, a process
that times out, runs out of memory or dies, and a completion without code all give 0.0. ``tests`` of ``None``
or an empty list give ``None`` (not applicable).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastalign.rewards.base import completion_texts

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)

_RUNNER = r"""
import os, sys
_result_path = os.environ.pop("FASTALIGN_RESULT", "")
import resource
# fail closed: a limit that cannot be set raises here, the process exits non-zero and the reward is 0
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (int(sys.argv[1]),) * 2)
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]),) * 2)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]),) * 2)
import json, socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the fastalign code sandbox")
class _NoSocket:
    def __init__(self, *args, **kwargs):
        _no_network()
socket.socket = _NoSocket
socket.SocketType = _NoSocket
socket.create_connection = _no_network
socket.create_server = _no_network
socket.getaddrinfo = _no_network
socket.gethostbyname = _no_network
socket.socketpair = _no_network
socket.fromfd = _no_network
sys.modules["_socket"] = None
sys.modules["socket"] = socket
with open("payload.json", encoding="utf-8") as f:
    _payload = json.load(f)
os.remove("payload.json")
def _report(passed, total):
    with open(_result_path, "w") as f:
        f.write(json.dumps([passed, total]))
_ns = {"__name__": "__main__", "__builtins__": __builtins__}
_tests = _payload["tests"]
try:
    exec(compile(_payload["program"], "solution.py", "exec"), _ns)
except BaseException:
    _report(0, len(_tests))
    os._exit(0)
_passed = 0
for _test in _tests:
    try:
        exec(compile(_test, "test.py", "exec"), _ns)
        _passed += 1
    except BaseException:
        pass
_report(_passed, len(_tests))
os._exit(0)
"""


def extract_code(text: str) -> str:
    """The last fenced ```` ```python ```` (or ```` ```py ````, or unlabelled) block of ``text``; the whole text
    when there is no such block."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("python", "py", "python3", "")]
    return blocks[-1] if blocks else text


def _normalize_tests(tests: Any) -> list[str] | None:
    if tests is None:
        return None
    if isinstance(tests, str):
        return [tests] if tests.strip() else None
    if isinstance(tests, Sequence):
        out = [str(t) for t in tests if t is not None and str(t).strip()]
        return out or None
    return [str(tests)]


class CodeReward:
    """Reward function: the fraction of a row's ``tests`` the completion's Python program passes.

    See the module docstring for the sandbox guarantees and the reward semantics.

    Args:
        timeout: wall-clock seconds per program (the CPU limit is ``ceil(timeout)`` seconds).
        memory_mb: address-space limit of the process, in MiB.
        max_file_mb: largest file the program may write, in MiB.
        max_workers: programs run in parallel (default: ``min(4, cpu_count)``).
        python: the interpreter (default: ``sys.executable``).
    """

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        max_file_mb: int = 16,
        max_workers: int | None = None,
        python: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be at least 64 (the interpreter needs it), got {memory_mb}")
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.max_file_mb = int(max_file_mb)
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.python = python or sys.executable
        self.__name__ = self.name = "code_reward"

    def run(self, program: str, tests: Sequence[str]) -> float:
        """The pass rate of ``program`` on ``tests`` (0.0 on any failure, timeout or crash)."""
        workdir = tempfile.mkdtemp(prefix="fastalign-code-")
        try:
            rundir = os.path.join(workdir, "run")
            os.mkdir(rundir)
            result_path = os.path.join(workdir, secrets.token_hex(16))
            with open(os.path.join(rundir, "payload.json"), "w", encoding="utf-8") as f:
                json.dump({"program": program, "tests": list(tests)}, f)
            env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "FASTALIGN_RESULT": result_path}
            cpu = max(1, int(-(-self.timeout // 1)))
            cmd = [
                self.python,
                "-I",
                "-c",
                _RUNNER,
                str(cpu),
                str(self.memory_mb * 2**20),
                str(self.max_file_mb * 2**20),
            ]
            proc = subprocess.Popen(
                cmd,
                cwd=rundir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                return 0.0
            finally:
                _kill_group(proc)
                if proc.poll() is None:
                    proc.wait()
            if proc.returncode != 0 or not os.path.exists(result_path):
                return 0.0
            with open(result_path, encoding="utf-8") as f:
                passed, total = json.loads(f.read(1000))
            if not (isinstance(passed, int) and isinstance(total, int)) or total <= 0:
                return 0.0
            return min(max(passed, 0), total) / total
        except Exception:  # a broken program or harness failure scores 0, never crashes training
            return 0.0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def __call__(self, completions: Sequence[Any], tests: Sequence[Any], **kwargs: Any) -> list[float | None]:
        texts = completion_texts(completions)
        if len(texts) != len(tests):
            raise ValueError(f"{len(texts)} completions but {len(tests)} test entries")
        jobs = [(extract_code(text), _normalize_tests(t)) for text, t in zip(texts, tests, strict=True)]
        rewards: list[float | None] = [None] * len(jobs)
        todo = [i for i, (_, t) in enumerate(jobs) if t is not None]
        if not todo:
            return rewards
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(todo))) as pool:
            for i, r in zip(todo, pool.map(lambda i: self.run(*jobs[i]), todo), strict=True):
                rewards[i] = r
        return rewards

    def __repr__(self) -> str:
        return f"CodeReward(timeout={self.timeout}, memory_mb={self.memory_mb}, max_workers={self.max_workers})"


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):  # ProcessLookupError: the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)


code_reward = CodeReward()
"""The default :class:`CodeReward` (10 s, 1 GiB, up to 4 programs in parallel)."""
