"""Code reward: run the completion's Python program against the row's tests in a sandbox, judged by the parent.

Reward
------
The fraction of tests that pass (open-r1's / TRL's pass rate): ``tests`` is a list of strings of Python code,
each run after the program in its namespace, one string = one test; a single string counts as one test (1.0
or 0.0). A program that fails to compile or raises at import, a run that times out, runs out of memory, writes
too much or dies, and a completion without code all give 0.0. ``tests`` of ``None`` or an empty list give
``None`` (not applicable); a test that is not a string (an int, a dict) is refused with ``ValueError``.

Who decides that a test passed
------------------------------
The program runs in the same process as the tests, so anything that process reports could be forged by the
program (it can read and rewrite the harness's memory). The verdict is therefore taken by the parent, from
values the program cannot fake without solving the task:

- ``assert <expr> <op> <literal>`` (or ``<literal> <op> <expr>``; ``op`` one of ``== != < <= > >= in not in``,
  or ``is`` / ``is not`` with ``None``/``True``/``False``) — the common form — sends only ``<expr>`` into the
  sandbox; the literal, the expected answer, never enters it. The sandbox sends back ``<expr>``'s value as plain
  data (``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``bytearray``, ``list``,
  ``tuple``, ``dict``, ``set``, ``frozenset``; a subclass counts as its base type, so an object whose ``__eq__``
  always answers ``True`` gains nothing) and the parent compares. Any other value fails the test.
- ``assert <expr> <op> <expr>``: both values come back and the parent compares them when both are plain data;
  otherwise the comparison runs in the sandbox.
- ``assert <literal>`` is decided by the parent without running anything.
- Any other test (``assert f(x)``, several statements) runs in the sandbox and reports whether it raised. Such a
  test proves no more than the program allows: a program can always make it pass (by redefining what it
  calls), with or without attacking the harness.

The program runs under :mod:`fastalign.rewards.sandbox` (bubblewrap: no network, no view of the host's files or
processes, a private size-limited ``/tmp``, CPU / memory / file-size / process limits). If ``bwrap`` is missing
the reward refuses to run and says how to install it; ``CodeReward(sandbox="unsandboxed")`` opts in to running
the same harness without the sandbox (the trainer's user, files and network), and only by that name.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastalign.ops._checks import check_number
from fastalign.rewards.base import completion_texts
from fastalign.rewards.sandbox import PRELUDE, RUNNERS, Limits, SandboxUnavailableError, run_sandboxed

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)

# The harness: limits first (PRELUDE), then the payload from stdin, then the program and the probes. It reports
# one JSON line per probe on a private copy of stdout; the program's own stdout/stderr go to /dev/null.
_HARNESS = (
    PRELUDE
    + r"""
def _harness():
    import json
    _isinstance, _type, _len, _id, _bool, _str, _format = isinstance, type, len, id, bool, str, format
    _dumps, _write, _exit, _exec, _eval, _compile = json.dumps, os.write, os._exit, exec, eval, compile
    payload = json.loads(sys.stdin.buffer.read())
    results = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    def encode(value, depth, seen):
        # plain data only, read through the base types' own methods so that subclasses cannot lie
        if depth > 64:
            raise ValueError("too deep")
        if value is None:
            return ["n"]
        if _type(value) is bool:
            return ["b", value]
        if _isinstance(value, int):
            return ["i", _format(int.__int__(value), "x")]
        if _isinstance(value, float):
            return ["f", float.hex(float.__float__(value))]
        if _type(value) is complex:
            return ["c", float.hex(value.real), float.hex(value.imag)]
        if _isinstance(value, str):
            return ["s", str.__str__(value)]
        if _isinstance(value, bytes):
            return ["y", bytes.hex(value)]
        if _isinstance(value, bytearray):
            return ["Y", bytearray.hex(value)]
        containers = ((list, "l", list.__iter__), (tuple, "t", tuple.__iter__), (set, "S", set.__iter__),
                      (frozenset, "F", frozenset.__iter__))
        for base, tag, items in containers:
            if _isinstance(value, base):
                if _id(value) in seen:
                    raise ValueError("cycle")
                seen.add(_id(value))
                out = [tag, [encode(item, depth + 1, seen) for item in items(value)]]
                seen.discard(_id(value))
                return out
        if _isinstance(value, dict):
            if _id(value) in seen:
                raise ValueError("cycle")
            seen.add(_id(value))
            out = ["d", [[encode(k, depth + 1, seen), encode(v, depth + 1, seen)] for k, v in dict.items(value)]]
            seen.discard(_id(value))
            return out
        raise ValueError("not plain data")

    def report(index, **fields):
        line = (_dumps({"i": index, **fields}) + "\n").encode()
        while line:
            line = line[_write(results, line):]

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        _exec(_compile(payload["program"], "solution.py", "exec"), namespace)
    except BaseException:
        _exit(0)  # no reports: every test fails
    compare = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
               "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
               "in": lambda a, b: a in b, "not in": lambda a, b: a not in b, "is": lambda a, b: a is b,
               "is not": lambda a, b: a is not b}
    for index, probe in enumerate(payload["probes"]):
        try:
            if probe["kind"] == "exec":
                _exec(_compile(probe["code"], "test.py", "exec"), namespace)
                report(index, passed=True)
            elif probe["kind"] == "truth":
                report(index, passed=_bool(_eval(_compile(probe["expr"], "test.py", "eval"), namespace)))
            else:
                values = [_eval(_compile(expr, "test.py", "eval"), namespace) for expr in probe["exprs"]]
                try:
                    report(index, values=[encode(value, 0, set()) for value in values])
                except ValueError:
                    if _len(values) != 2:
                        raise
                    report(index, passed=_bool(compare[probe["op"]](*values)))
        except BaseException:
            report(index, passed=False)
    _exit(0)

_harness()
"""
)

_OPERATORS: dict[type, tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
    ast.In: ("in", lambda a, b: a in b),
    ast.NotIn: ("not in", lambda a, b: a not in b),
    ast.Is: ("is", operator.is_),
    ast.IsNot: ("is not", operator.is_not),
}
_SINGLETONS = (None, True, False)


@dataclass(frozen=True)
class _Plan:
    """How the parent judges one test: ``decided`` without running it, or by ``probe``'s report and ``judge``."""

    decided: bool | None = None
    probe: dict | None = None
    judge: Callable[[list[Any]], bool] | None = None


def _literal(node: ast.expr) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def plan_test(test: str) -> _Plan:
    """How ``test`` is judged (see the module docstring): what the sandbox evaluates and how the parent
    decides from what it sends back. Literals on one side of a comparison stay in the parent."""
    try:
        body = ast.parse(test, mode="exec").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return _Plan(decided=False)
    if len(body) != 1 or not isinstance(body[0], ast.Assert):
        return _Plan(probe={"kind": "exec", "code": test})
    condition = body[0].test
    is_literal, value = _literal(condition)
    if is_literal:
        return _Plan(decided=bool(value))
    if isinstance(condition, ast.Compare) and len(condition.ops) == 1 and type(condition.ops[0]) in _OPERATORS:
        name, compare = _OPERATORS[type(condition.ops[0])]
        left, right = condition.left, condition.comparators[0]
        (left_literal, left_value), (right_literal, right_value) = _literal(left), _literal(right)
        if name in ("is", "is not"):
            literal_ok = (left_literal and any(left_value is s for s in _SINGLETONS)) or (
                right_literal and any(right_value is s for s in _SINGLETONS)
            )
            if (left_literal or right_literal) and not literal_ok:
                return _Plan(probe={"kind": "truth", "expr": ast.unparse(condition)})
        if right_literal:
            expected = right_value
            return _Plan(
                probe={"kind": "values", "exprs": [ast.unparse(left)]}, judge=lambda v: compare(v[0], expected)
            )
        if left_literal:
            expected = left_value
            return _Plan(
                probe={"kind": "values", "exprs": [ast.unparse(right)]}, judge=lambda v: compare(expected, v[0])
            )
        return _Plan(
            probe={"kind": "values", "exprs": [ast.unparse(left), ast.unparse(right)], "op": name},
            judge=lambda v: compare(v[0], v[1]),
        )
    return _Plan(probe={"kind": "truth", "expr": ast.unparse(condition)})


def decode_value(tagged: Any, depth: int = 0) -> Any:
    """The plain-data value the harness encoded (``ValueError`` on anything malformed)."""
    if depth > 64 or not isinstance(tagged, list) or not tagged or not isinstance(tagged[0], str):
        raise ValueError(f"malformed value {tagged!r:.80}")
    tag, rest = tagged[0], tagged[1:]
    simple: dict[str, Callable[[], Any]] = {
        "n": lambda: None,
        "b": lambda: _exact(rest[0], bool),
        "i": lambda: int(_exact(rest[0], str), 16),
        "f": lambda: float.fromhex(_exact(rest[0], str)),
        "c": lambda: complex(float.fromhex(_exact(rest[0], str)), float.fromhex(_exact(rest[1], str))),
        "s": lambda: _exact(rest[0], str),
        "y": lambda: bytes.fromhex(_exact(rest[0], str)),
        "Y": lambda: bytearray.fromhex(_exact(rest[0], str)),
    }
    containers: dict[str, type] = {"l": list, "t": tuple, "S": set, "F": frozenset}
    try:
        if tag in simple:
            return simple[tag]()
        if tag in containers:
            return containers[tag](decode_value(item, depth + 1) for item in _exact(rest[0], list))
        if tag == "d":
            return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in _exact(rest[0], list)}
    except (IndexError, TypeError) as error:  # wrong arity, unhashable keys
        raise ValueError(f"malformed value {tagged!r:.80}: {error}") from None
    raise ValueError(f"unknown value tag {tag!r}")


def _exact(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise ValueError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def judge_reports(plans: Sequence[_Plan], stdout: bytes) -> list[bool]:
    """Per test, whether it passed, from the plans and the harness's report lines (first report per test)."""
    reports: dict[int, dict] = {}
    for line in stdout.splitlines():
        try:
            report = json.loads(line)
        except (ValueError, RecursionError):
            continue
        index = report.get("i") if isinstance(report, dict) else None
        if type(index) is int and index not in reports:
            reports[index] = report
    passed: list[bool] = []
    probe_index = 0
    for plan in plans:
        if plan.decided is not None:
            passed.append(plan.decided)
            continue
        report = reports.get(probe_index, {})
        probe_index += 1
        passed.append(_judge(plan, report))
    return passed


def _judge(plan: _Plan, report: dict) -> bool:
    if "values" in report and plan.judge is not None:
        try:
            values = [decode_value(v) for v in report["values"]]
            if len(values) != len(plan.probe["exprs"]):
                return False
            return bool(plan.judge(values))
        except (ValueError, TypeError, OverflowError, RecursionError, MemoryError):
            return False
    verdict = report.get("passed")
    if plan.probe["kind"] == "values" and len(plan.probe["exprs"]) != 2:
        return False  # a value compared with a literal must come back as data: never a bare verdict
    return verdict is True


def extract_code(text: str) -> str:
    """The last fenced ```` ```python ```` (or ```` ```py ````, or unlabelled) block of ``text``; the whole text
    when there is no such block."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("python", "py", "python3", "")]
    return blocks[-1] if blocks else text


def normalize_tests(tests: Any, *, row: int | None = None) -> list[str] | None:
    """``tests`` as a list of test strings, ``None`` when there are none; ``ValueError`` naming the row and the
    item when a test is not a string (an int would otherwise run as the statement ``3`` and pass)."""
    where = "" if row is None else f"row {row}: "
    if tests is None:
        return None
    if isinstance(tests, str):
        return [tests] if tests.strip() else None
    if not isinstance(tests, Sequence):
        raise ValueError(f"{where}tests must be a string or a list of strings, got {type(tests).__name__}")
    out = []
    for i, test in enumerate(tests):
        if test is None:
            continue
        if not isinstance(test, str):
            raise ValueError(
                f"{where}tests[{i}] must be a string of Python code, got {type(test).__name__} {test!r:.40}"
            )
        if test.strip():
            out.append(test)
    return out or None


class CodeReward:
    """Reward function: the fraction of a row's ``tests`` the completion's Python program passes.

    See the module docstring for who judges a test and :mod:`fastalign.rewards.sandbox` for the sandbox.

    Args:
        timeout: wall-clock seconds per program, all its tests together (the CPU limit is ``ceil(timeout)``).
        memory_mb: address-space limit of each process, in MiB.
        max_file_mb: largest file the program may write, in MiB.
        max_disk_mb: everything the program may write together (the size of its private ``/tmp``), in MiB;
            ``None`` for no total limit (needed with bubblewrap older than 0.7).
        max_processes: processes and threads the program may have at once.
        max_workers: programs run in parallel (default: ``min(4, cpu_count)``).
        python: the interpreter (default: ``sys.executable``); its prefix is bound read-only into the sandbox.
        site_packages: let programs import the interpreter's site-packages (default: standard library only).
        sandbox: ``"bwrap"`` (default) or ``"unsandboxed"``: the latter runs model-written code with the
            trainer's rights and must be asked for by name.
    """

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        max_file_mb: int = 16,
        max_disk_mb: int | None = 32,
        max_processes: int = 16,
        max_workers: int | None = None,
        python: str | None = None,
        site_packages: bool = False,
        sandbox: str = "bwrap",
    ) -> None:
        check_number("timeout", timeout, above=0, why="seconds")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be at least 64 (the interpreter needs it), got {memory_mb}")
        if max_file_mb < 1:
            raise ValueError(f"max_file_mb must be at least 1, got {max_file_mb}")
        if max_disk_mb is not None and max_disk_mb < 1:
            raise ValueError(f"max_disk_mb must be at least 1 or None, got {max_disk_mb}")
        if max_processes < 1:
            raise ValueError(f"max_processes must be at least 1, got {max_processes}")
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if sandbox not in RUNNERS:
            raise ValueError(f"sandbox must be one of {RUNNERS}, got {sandbox!r}")
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.max_file_mb = int(max_file_mb)
        self.max_disk_mb = None if max_disk_mb is None else int(max_disk_mb)
        self.max_processes = int(max_processes)
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.python = python or sys.executable
        self.site_packages = bool(site_packages)
        self.sandbox = sandbox
        self.__name__ = self.name = "code_reward" if sandbox == "bwrap" else f"{sandbox}_code_reward"

    def _limits(self) -> Limits:
        return Limits(
            wall_seconds=self.timeout,
            memory_bytes=self.memory_mb * 2**20,
            file_bytes=self.max_file_mb * 2**20,
            disk_bytes=None if self.max_disk_mb is None else self.max_disk_mb * 2**20,
            processes=self.max_processes,
        )

    def test_results(self, program: str, tests: Sequence[str]) -> list[bool]:
        """Per test, whether ``program`` passed it (all ``False`` on a crash, timeout or too much output).
        Raises :class:`SandboxUnavailableError` when the sandbox cannot run here."""
        tests = normalize_tests(list(tests)) or []
        plans = [plan_test(test) for test in tests]
        probes = [plan.probe for plan in plans if plan.decided is None]
        payload = json.dumps({"program": program, "probes": probes}).encode()
        flags = ("-I",) if self.site_packages else ("-I", "-S")
        done = run_sandboxed(
            _HARNESS, payload, self._limits(), runner=self.sandbox, python=self.python, python_flags=flags
        )
        if done.returncode != 0:
            if self.sandbox == "bwrap" and done.returncode is not None and b"bwrap:" in done.stderr:
                raise SandboxUnavailableError(
                    f"bubblewrap failed to start the sandbox: {done.stderr.decode(errors='replace').strip()}"
                )
            return [False] * len(tests)
        return judge_reports(plans, done.stdout)

    def run(self, program: str, tests: Sequence[str]) -> float:
        """The pass rate of ``program`` on ``tests`` (0.0 on any failure, timeout or crash)."""
        results = self.test_results(program, tests)
        return sum(results) / len(results) if results else 0.0

    def check(self) -> None:
        """Raise :class:`SandboxUnavailableError` (with how to fix it) unless a trivial program runs and passes."""
        if self.test_results("x = 1", ["assert x == 1"]) != [True]:
            raise SandboxUnavailableError(f"{self!r} could not run `x = 1` against `assert x == 1`")

    def __call__(self, completions: Sequence[Any], tests: Sequence[Any], **kwargs: Any) -> list[float | None]:
        texts = completion_texts(completions)
        if len(texts) != len(tests):
            raise ValueError(f"{len(texts)} completions but {len(tests)} test entries")
        jobs = [
            (extract_code(text), normalize_tests(t, row=i))
            for i, (text, t) in enumerate(zip(texts, tests, strict=True))
        ]
        rewards: list[float | None] = [None] * len(jobs)
        todo = [i for i, (_, t) in enumerate(jobs) if t is not None]
        if not todo:
            return rewards
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(todo))) as pool:
            for i, r in zip(todo, pool.map(lambda i: self.run(*jobs[i]), todo), strict=True):
                rewards[i] = r
        return rewards

    def __repr__(self) -> str:
        return (
            f"CodeReward(timeout={self.timeout}, memory_mb={self.memory_mb}, max_workers={self.max_workers}, "
            f"sandbox={self.sandbox!r})"
        )


code_reward = CodeReward()
"""The default :class:`CodeReward` (bubblewrap sandbox, 10 s, 1 GiB, up to 4 programs in parallel)."""

unsandboxed_code_reward = CodeReward(sandbox="unsandboxed")
""":data:`code_reward` without the sandbox: model-written code runs with the trainer's user, files and network.
Only for trusted completions; ``--reward_funcs unsandboxed_code_reward`` asks for it by name."""
