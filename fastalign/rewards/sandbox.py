"""Run an untrusted Python program under bubblewrap (``bwrap``): the launcher behind :class:`CodeReward`.

What the sandbox is
-------------------
``bwrap`` (Debian/Ubuntu/Fedora package ``bubblewrap``, the tool Flatpak is built on) starts the interpreter in
new PID, network, IPC, UTS and cgroup namespaces (plus a user namespace when the trainer is not root), with a
fresh root file system that holds only, read-only, the shared-library folders and the interpreter's own
prefix, a fresh ``/proc`` and a minimal ``/dev``, and one writable place: a private, size-limited tmpfs at
``/tmp``. ``--die-with-parent`` and ``--new-session`` tie it to the runner and detach it from the terminal; the
whole PID namespace dies with its first process, so no grandchild outlives a run. The environment is empty
but for ``PATH``, ``HOME`` and the locale. Before any untrusted code runs, the harness sets ``RLIMIT_CPU``,
``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``, ``RLIMIT_NOFILE`` and ``RLIMIT_CORE`` (soft = hard) and, when
the trainer runs as root, drops to an unprivileged user id of its own (root ignores ``RLIMIT_NPROC``). The
parent enforces the wall-clock timeout and caps what it reads back.

What is still trusted
---------------------
The kernel's namespaces (a kernel exploit escapes any container), the read-only files bound in (the program
can read the interpreter's prefix and the system libraries, nothing else of the host), and the CPU and
memory it is given. Without user namespaces (``bwrap`` cannot start as a normal user on some distributions,
e.g. Ubuntu 24.04's AppArmor default) the sandbox refuses to start and says so; it never degrades silently.

``runner="unsandboxed"`` (an explicit opt-in by name) runs the same harness in a plain ``python -I`` process
with the same rlimits and its own session, but with the trainer's user, file system and network.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

RUNNERS = ("bwrap", "unsandboxed")
"""The runners :func:`run_sandboxed` accepts; ``"unsandboxed"`` must be asked for by name."""

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; Fedora: `sudo dnf install "
    "bubblewrap`; Arch: `pacman -S bubblewrap`), or opt in to running model-written code without a sandbox "
    'with CodeReward(sandbox="unsandboxed")'
)

_MIN_SIZE_VERSION = (0, 7, 0)  # bwrap gained --size (a size-limited tmpfs) in 0.7.0

# Unprivileged user ids for sandboxes started by root: one block of 64 per runner process so that concurrent
# sandboxes never share an RLIMIT_NPROC count (the kernel counts processes per real user id).
_UID_BASE = 1_000_000_000
_uid_lock = threading.Lock()
_uid_next = 0

PRELUDE = r"""
import os, sys, resource
def _limit():
    cpu, memory, file_size, processes, open_files, uid = (int(a) for a in sys.argv[1:7])
    for which, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_NOFILE, open_files)):
        resource.setrlimit(which, (value, value))  # fails closed: an error exits non-zero and scores 0
    if uid >= 0:  # started as root: leave it for an id of our own before any untrusted code runs
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
_limit()
del _limit
"""
"""Python source the harness must start with: it reads the limits from ``sys.argv[1:7]`` (as
:func:`run_sandboxed` passes them) and applies them before anything else runs."""


class SandboxUnavailableError(RuntimeError):
    """The sandbox cannot run here (``bwrap`` missing, too old, or not allowed to create namespaces)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run.

    Attributes:
        wall_seconds: wall-clock time, enforced by the parent (the CPU limit is its ceiling in whole seconds).
        memory_bytes: ``RLIMIT_AS`` of every process.
        file_bytes: the largest file any process may write (``RLIMIT_FSIZE``).
        disk_bytes: size of the writable tmpfs, all files together (``None``: no tmpfs size limit).
        processes: ``RLIMIT_NPROC``: processes and threads of the sandbox's user.
        open_files: ``RLIMIT_NOFILE``.
        output_bytes: the most the parent reads from the harness's stdout before it kills the run.
    """

    wall_seconds: float
    memory_bytes: int
    file_bytes: int
    disk_bytes: int | None
    processes: int
    open_files: int = 256
    output_bytes: int = 4 * 2**20


@dataclass(frozen=True)
class Completed:
    """What one run left: ``returncode`` (``None`` when it was killed for time or output) and its stdout."""

    returncode: int | None
    stdout: bytes
    timed_out: bool
    output_exceeded: bool
    stderr: bytes


def find_bwrap() -> str | None:
    """The ``bwrap`` executable on ``PATH`` (or in ``/usr/bin``), or ``None``."""
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")


@functools.lru_cache(maxsize=8)
def bwrap_version(bwrap: str) -> tuple[int, ...]:
    """``bwrap --version`` as a tuple, e.g. ``(0, 8, 0)``."""
    out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise SandboxUnavailableError(f"cannot read the version of {bwrap}: {out!r}")
    return tuple(int(part or 0) for part in match.groups())


def interpreter_paths(python: str) -> list[str]:
    """Folders the sandbox binds read-only so that ``python`` starts: its prefix (both the given path's, e.g. a
    virtual environment, and the resolved binary's), and for the running interpreter its base prefixes."""
    paths = {os.path.dirname(os.path.dirname(os.path.abspath(python)))}
    paths.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths.update({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    return sorted({os.path.realpath(p) for p in paths} | paths)


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def bwrap_arguments(bwrap: str, python: str, disk_bytes: int | None, *, as_root: bool) -> list[str]:
    """The ``bwrap`` command line that runs ``python`` in the sandbox described in the module docstring."""
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if as_root:  # no user namespace (it would map the sandbox back to root); the harness drops to its own id
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    args += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for name, value in (("PATH", "/usr/bin:/bin"), ("HOME", "/tmp"), ("LANG", "C.UTF-8"), ("LC_ALL", "C.UTF-8")):
        args += ["--setenv", name, value]
    binds: list[str] = []
    for path in ["/usr/lib", "/usr/lib64", "/usr/lib32", *interpreter_paths(python)]:
        if os.path.isdir(path) and not os.path.islink(path) and not any(_inside(path, b) for b in binds):
            binds = [b for b in binds if not _inside(b, path)] + [path]
    # The writable tmpfs first: an interpreter under /tmp (a virtual environment in a temporary clone) is then
    # bound on top of it instead of being hidden by it.
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "01777"]
    if disk_bytes is not None:
        args += ["--size", str(disk_bytes)]
    args += ["--tmpfs", "/tmp"]
    made: set[str] = {"/proc", "/dev", "/tmp"}
    for top in ("/lib", "/lib64", "/lib32", "/bin"):  # merged-/usr systems link these into /usr
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
            made.add(top)
        elif os.path.isdir(top) and top != "/bin":
            binds.append(top)
    for path in sorted(binds):
        for parent in _ancestors(path):
            if parent not in made:  # bwrap would make them 0700 under a root trainer; the sandbox user must pass
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", path, path]
        made.add(path)
    return [*args, "--chdir", "/tmp"]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _sandbox_uid() -> int:
    global _uid_next
    with _uid_lock:
        _uid_next = (_uid_next + 1) % 64
        return _UID_BASE + (os.getpid() % 1_000_000) * 64 + _uid_next


def check_bwrap(bwrap: str | None, disk_bytes: int | None) -> str:
    """``bwrap``'s path, or :class:`SandboxUnavailableError` saying what is missing and how to get it."""
    if bwrap is None:
        raise SandboxUnavailableError(
            f"code rewards run model-written programs in a bubblewrap sandbox: {INSTALL_HINT}"
        )
    if disk_bytes is not None and bwrap_version(bwrap) < _MIN_SIZE_VERSION:
        found = ".".join(map(str, bwrap_version(bwrap)))
        raise SandboxUnavailableError(
            f"{bwrap} is bubblewrap {found}; a size-limited /tmp (max_disk_mb) needs bubblewrap >= 0.7.0: upgrade "
            "it, or pass max_disk_mb=None to keep only the per-file limit"
        )
    return bwrap


def run_sandboxed(
    harness: str,
    stdin: bytes,
    limits: Limits,
    *,
    runner: str = "bwrap",
    python: str | None = None,
    python_flags: tuple[str, ...] = ("-I",),
) -> Completed:
    """Run ``python <python_flags> -c harness <limits>`` with ``stdin`` and return its stdout.

    ``harness`` must begin with :data:`PRELUDE`. Raises :class:`SandboxUnavailableError` when ``runner="bwrap"`` and
    bwrap is missing or too old; a sandbox that fails to start shows as a non-zero ``returncode`` with bwrap's
    message in ``stderr``.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    python = python or sys.executable
    as_root = os.geteuid() == 0
    uid = _sandbox_uid() if runner == "bwrap" and as_root else -1
    cpu = max(1, int(-(-limits.wall_seconds // 1)))
    tail = [harness, str(cpu), str(limits.memory_bytes), str(limits.file_bytes), str(limits.processes)]
    tail += [str(limits.open_files), str(uid)]
    command = [python, *python_flags, "-c", *tail]
    if runner == "bwrap":
        bwrap = check_bwrap(find_bwrap(), limits.disk_bytes)
        command = [*bwrap_arguments(bwrap, python, limits.disk_bytes, as_root=as_root), *command]
        cwd = "/"
    else:
        cwd = None
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    with contextlib.ExitStack() as stack:
        if runner == "unsandboxed":
            cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastalign-code-"))
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        try:
            return _collect(proc, stdin, limits)
        finally:
            _kill_group(proc)
            if proc.poll() is None:
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
    raise AssertionError("unreachable")  # pragma: no cover


def _collect(proc: subprocess.Popen, stdin: bytes, limits: Limits) -> Completed:
    """Feed ``stdin`` and read stdout (capped) and stderr (first 64 KiB) until exit or the wall-clock limit."""
    deadline = time.monotonic() + limits.wall_seconds
    out, err = bytearray(), bytearray()
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as selector:
        os.set_blocking(proc.stdin.fileno(), False)
        if pending:
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return Completed(None, bytes(out), True, False, bytes(err))
            for key, _ in selector.select(timeout=left):
                if key.fileobj is proc.stdin:
                    try:
                        written = os.write(proc.stdin.fileno(), pending[:65536])
                    except (BrokenPipeError, BlockingIOError) as error:
                        written = len(pending) if isinstance(error, BrokenPipeError) else 0
                    pending = pending[written:]
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                if key.fileobj is proc.stdout:
                    out += chunk
                    if len(out) > limits.output_bytes:
                        return Completed(None, bytes(out), False, True, bytes(err))
                elif len(err) < 65536:
                    err += chunk
    try:
        returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return Completed(None, bytes(out), True, False, bytes(err))
    return Completed(returncode, bytes(out), False, False, bytes(err))


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):  # ProcessLookupError: the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
