"""Attacks a model-written program can make on the code reward (issue 16), each with a check that it escaped.

Every attack is a program and its tests, written so that the reward is 1.0 exactly when the attack worked, plus,
where the damage is outside the reward (a file written on the host, a connection made, the trainer killed), a
check on the host. ``tests/rewards/test_code_sandbox.py`` requires every one contained;
``python tests/helpers/code_attacks.py`` prints the table for whatever ``fastalign`` is importable (run it on an
old checkout for the "before" column).

Attacks marked ``trainer=True`` run inside a stand-in trainer process (its own environment secret, working
directory and process), so an escape cannot hurt the test runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field

TOKEN = "fastalign-attack-7f3a9c"  # what the host hides in files, environments and command lines


@dataclass
class Host:
    """What the attacks aim at: a folder with a secret file, a listener on 127.0.0.1, a trainer's secret."""

    folder: str
    port: int
    connections: list = field(default_factory=list)

    def secret_path(self) -> str:
        return os.path.join(self.folder, "secret.txt")

    def outside_path(self) -> str:
        return os.path.join(self.folder, "written-from-sandbox.txt")


def start_host() -> tuple[Host, socket.socket]:
    folder = tempfile.mkdtemp(prefix="fastalign-attack-host-")
    with open(os.path.join(folder, "secret.txt"), "w") as f:
        f.write(TOKEN)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    host = Host(folder, listener.getsockname()[1])

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            host.connections.append(conn.recv(64))
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return host, listener


@dataclass(frozen=True)
class Attack:
    name: str
    program: str
    tests: tuple[str, ...] = ("assert escaped == True",)
    trainer: bool = False  # run inside a stand-in trainer process
    escaped_on_host: str | None = None  # the host check that matters most ("connection", "process", ...)
    reward_means_escape: bool = True  # False: the program's tests pass either way; only the host check counts


def _attempt(body: str) -> str:
    """A program that sets ``escaped`` to whether ``body`` ran without raising and left ``ok`` true."""
    return (
        "escaped = False\ntry:\n"
        + textwrap.indent(textwrap.dedent(body).strip(), "    ")
        + ("\n    escaped = bool(ok)\nexcept BaseException:\n    escaped = False\n")
    )


def attacks(host: Host) -> list[Attack]:
    port, secret, outside = host.port, host.secret_path(), host.outside_path()
    connect_py = f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=2); s.send(b'x')"
    forge_lines = (
        "import os\n"
        "for fd in range(3, 64):\n"
        '    for line in (\'{"i": 0, "passed": true}\', \'{"i": 0, "values": [["i", "0"]]}\',\n'
        '                 \'{"i": 0, "values": [["b", true]]}\', \'{"i": 0, "values": [["s", ""]]}\'):\n'
        "        try:\n"
        "            os.write(fd, (line + '\\n').encode())\n"
        "        except OSError:\n"
        "            pass\n"
    )
    return [
        Attack(
            "forge the harness's report",
            "import sys, os\nsys.modules['__main__']._report(1, 1)\nos._exit(0)",
            ("assert False",),
        ),
        Attack(
            "rewrite the harness's test list",
            "import sys\nsys.modules['__main__'].__dict__['_tests'][:] = ['pass']",
            ("assert ok",),
        ),
        Attack("forge report lines on every fd", forge_lines + "os._exit(0)", (f"assert answer() == '{TOKEN}'",)),
        Attack("read /etc/passwd", _attempt("ok = 'root:' in open('/etc/passwd').read()")),
        Attack("read a host file ($HOME)", _attempt(f"ok = {TOKEN!r} in open({secret!r}).read()")),
        Attack(
            "write a file outside its folder",
            _attempt(f"open({outside!r}, 'w').write('x')\nok = True"),
            escaped_on_host="file",
        ),
        Attack(
            "write 3 x 15 MB (limit per file only)",
            _attempt(
                "for i in range(3):\n    with open(f'big{i}', 'wb') as f:\n"
                "        f.write(b'x' * 15 * 2**20)\nok = True"
            ),
        ),
        Attack(
            "reach 127.0.0.1 by re-importing _socket",
            _attempt(
                f"import sys\nsys.modules.pop('_socket', None)\nimport importlib, _socket\ns = _socket.socket()\n"
                f"s.settimeout(2)\ns.connect(('127.0.0.1', {port}))\ns.send(b'x')\nok = True"
            ),
            escaped_on_host="connection",
        ),
        Attack(
            "reach 127.0.0.1 from a subprocess of the interpreter",
            _attempt(
                f"import subprocess, sys\nok = subprocess.run([sys.executable, '-c', {connect_py!r}]).returncode == 0"
            ),
            escaped_on_host="connection",
        ),
        Attack(
            "reach 127.0.0.1 with bash /dev/tcp",
            _attempt(
                "import subprocess\n"
                f"ok = subprocess.run(['bash', '-c', 'echo x > /dev/tcp/127.0.0.1/{port}']).returncode == 0"
            ),
            escaped_on_host="connection",
        ),
        Attack(
            "reach 127.0.0.1 with a raw socket(2) through ctypes",
            _attempt(
                "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
                f"port = int.from_bytes(({port}).to_bytes(2, 'big'), 'little')\n"
                "addr = struct.pack('<HH4s8x', 2, port, bytes([127, 0, 0, 1]))\n"
                "ok = fd >= 0 and libc.connect(fd, addr, len(addr)) == 0 and libc.write(fd, b'x', 1) == 1"
            ),
            escaped_on_host="connection",
        ),
        Attack(
            "fork 50 children",
            _attempt(
                "import os, time\npids = []\nfor _ in range(50):\n    pid = os.fork()\n    if pid == 0:\n"
                "        time.sleep(2)\n        os._exit(0)\n    pids.append(pid)\nok = len(pids) == 50"
            ),
        ),
        Attack(
            "a setsid grandchild outlives the run",
            _attempt(
                "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', "
                f"{TOKEN!r}], start_new_session=True)\nok = False"
            ),
            escaped_on_host="process",
        ),
        Attack(
            "read the trainer's environment via /proc/<ppid>/environ",
            _attempt(
                "import os\nok = False\nfor pid in [os.getppid()] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                "    try:\n"
                f"        ok = ok or {TOKEN!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read()\n"
                "    except OSError:\n        pass"
            ),
            trainer=True,
        ),
        Attack(
            "change a file in the trainer's cwd via /proc/<ppid>/cwd",
            _attempt("import os\nopen(f'/proc/{os.getppid()}/cwd/victim.txt', 'w').write('changed')\nok = True"),
            trainer=True,
            escaped_on_host="cwd",
        ),
        Attack(
            "see the trainer's process in /proc",
            _attempt(
                "import os\nok = False\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n    try:\n"
                f"        ok = ok or {TOKEN!r}.encode() in open(f'/proc/{{pid}}/cmdline', 'rb').read()\n"
                "    except OSError:\n        pass"
            ),
            trainer=True,
        ),
        Attack(
            "kill the trainer",
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
            ("assert True",),
            trainer=True,
            escaped_on_host="trainer_dead",
            reward_means_escape=False,
        ),
        Attack(
            "read the trainer's secret from os.environ",
            _attempt(f"import os\nok = {TOKEN!r} in str(os.environ)"),
            trainer=True,
        ),
        Attack("infinite loop", "while True:\n    pass", ("assert True",)),
        Attack("8 GB allocation", _attempt("blob = bytearray(8 * 2**30)\nok = True")),
        Attack(
            "100 MB of output on every descriptor",
            "import os\nchunk = b'x' * 2**20\nfor fd in range(1, 64):\n    try:\n        for _ in range(100):\n"
            "            os.write(fd, chunk)\n    except OSError:\n        pass",
            ("assert True",),
            trainer=True,
            escaped_on_host="trainer_memory",
            reward_means_escape=False,
        ),
        Attack("plain socket to 127.0.0.1", _attempt(connect_py + "\nok = True"), escaped_on_host="connection"),
        Attack(
            "urllib to 127.0.0.1",
            _attempt(
                f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\nok = True"
            ),
            escaped_on_host="connection",
        ),
    ]


_TRAINER = r"""
import json, os, sys
from fastalign.rewards import CodeReward
program, tests, options = json.loads(sys.argv[1])
import resource
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reward = CodeReward(**options).run(program, tests)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"reward": reward, "grown": grown}), flush=True)
"""


def run_attack(attack: Attack, host: Host, options: dict, python: str = sys.executable) -> dict:
    """Run one attack; returns ``{"reward", "escaped", "why", "seconds"}``."""
    from fastalign.rewards import CodeReward

    before = len(host.connections)
    start = time.perf_counter()
    why = []
    if attack.trainer:
        cwd = tempfile.mkdtemp(prefix="fastalign-attack-trainer-")
        with open(os.path.join(cwd, "victim.txt"), "w") as f:
            f.write("original")
        env = {**os.environ, "FASTALIGN_ATTACK_SECRET": TOKEN}
        args = [python, "-c", _TRAINER, json.dumps([attack.program, list(attack.tests), options]), TOKEN]
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        report = json.loads(lines[-1]) if lines else {"reward": None, "grown": 0}
        reward = report["reward"]
        if report["grown"] > 50 * 2**20:
            why.append(f"trainer memory grew {report['grown'] / 2**20:.0f} MiB")
        if reward is None:
            why.append(f"trainer died (exit {done.returncode})")
        with open(os.path.join(cwd, "victim.txt")) as f:
            if f.read() != "original":
                why.append("trainer's file changed")
    else:
        reward = CodeReward(**options).run(attack.program, list(attack.tests))
    seconds = time.perf_counter() - start
    if reward and attack.reward_means_escape:
        why.append(f"reward {reward}")
    time.sleep(0.3)
    if len(host.connections) > before:
        why.append("listener reached")
    if os.path.exists(host.outside_path()):
        why.append("host file written")
        os.remove(host.outside_path())
    if attack.escaped_on_host == "process" and _process_with(TOKEN):
        why.append("grandchild alive")
        _kill_with(TOKEN)
    return {"reward": reward, "escaped": bool(why), "why": "; ".join(why), "seconds": seconds}


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and b"code_attacks" not in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def _process_with(marker: str) -> bool:
    return bool(_processes_with(marker))


def _kill_with(marker: str) -> None:
    for pid in _processes_with(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def main() -> None:
    options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"timeout": 5}
    host, listener = start_host()
    rows = []
    for attack in attacks(host):
        result = run_attack(attack, host, options)
        rows.append((attack.name, result))
        verdict = "ESCAPED" if result["escaped"] else "contained"
        print(f"| {attack.name} | {verdict} | {result['why'] or '-'} | {result['seconds']:.1f} s |", flush=True)
    listener.close()
    print(f"{sum(r['escaped'] for _, r in rows)} of {len(rows)} escaped")


if __name__ == "__main__":
    main()
