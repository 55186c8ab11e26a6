"""The code reward's sandbox and judge (issue 16): every attack in tests/helpers/code_attacks.py is contained, the
parent judges from values the program cannot fake, and the reward refuses to run without bubblewrap."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
from helpers import code_attacks

from fastalign.rewards import CodeReward, code_execution, sandbox
from fastalign.rewards.code_execution import decode_value, judge_reports, normalize_tests, plan_test
from fastalign.rewards.sandbox import SandboxUnavailableError

OPTIONS = {"timeout": 5}


def test_bwrap_is_installed_for_the_suite():
    # .ci/run / `make test` install bubblewrap; a machine without it must fail here, not skip the sandbox tests
    assert sandbox.find_bwrap(), f"bwrap not found: {sandbox.INSTALL_HINT}"


@pytest.fixture(scope="module")
def host():
    host, listener = code_attacks.start_host()
    yield host
    listener.close()
    shutil.rmtree(host.folder, ignore_errors=True)


@pytest.mark.parametrize("index", range(len(code_attacks.attacks(code_attacks.Host("/x", 1)))))
def test_attack_is_contained(host, index):
    attack = code_attacks.attacks(host)[index]
    result = code_attacks.run_attack(attack, host, OPTIONS)
    assert not result["escaped"], f"{attack.name}: {result['why']}"
    if attack.name == "infinite loop":
        assert result["seconds"] < OPTIONS["timeout"] + 3


def test_attacks_do_escape_without_the_sandbox(host):
    # the checks can fail: the same attacks, run unsandboxed, get out (this is what the sandbox adds)
    by_name = {a.name: a for a in code_attacks.attacks(host)}
    options = {**OPTIONS, "sandbox": "unsandboxed"}
    for name in ("read a host file ($HOME)", "write a file outside its folder", "plain socket to 127.0.0.1"):
        result = code_attacks.run_attack(by_name[name], host, options)
        assert result["escaped"], name
    # the judge is the same unsandboxed, so forging still fails there
    assert not code_attacks.run_attack(by_name["forge the harness's report"], host, options)["escaped"]


def test_expected_literals_never_enter_the_sandbox():
    tests = ["assert f(3) == 'secret-answer-1'", "assert 'secret-answer-2' in g()", "assert h() is None"]
    probes = [plan_test(t).probe for t in tests]
    assert "secret-answer" not in json.dumps(probes)
    assert probes[0] == {"kind": "values", "exprs": ["f(3)"]}
    assert plan_test("assert False").decided is False and plan_test("assert (1, 2)").decided is True
    assert plan_test("assert f(").decided is False
    assert plan_test("x = f()\nassert x").probe["kind"] == "exec"
    assert plan_test("assert f(1) == f(2)").probe == {"kind": "values", "exprs": ["f(1)", "f(2)"], "op": "=="}


def test_values_are_read_as_their_base_types():
    reward = CodeReward(**OPTIONS)
    program = textwrap.dedent(
        """
        class AlwaysEqual:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        class Liar(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        class Rows(list):
            def __iter__(self):
                return iter([])
        def always():
            return AlwaysEqual()
        def liar():
            return Liar(5)
        def rows():
            return Rows([1, 2])
        def data():
            return {"a": [1, 2.5, None, True], (1, "x"): {3, 4}, "b": b"\\x00", "n": float("nan"), "big": 3**200}
        """
    )
    tests = [
        "assert always() == 42",  # the AlwaysEqual hack fails: the value is not plain data
        "assert liar() == 7",  # an int subclass is its int: 5
        "assert liar() == 5",
        "assert rows() == [1, 2]",  # a list subclass is read through list's own iterator
        "assert data()['a'] == [1, 2.5, None, True]",
        "assert data()[(1, 'x')] == {3, 4}",
        "assert data()['b'] == b'\\x00'",
        "assert data()['n'] != data()['n']",  # nan compares as Python compares it
        f"assert data()['big'] == {3**200}",
        "assert always() == always()",  # both sides unreadable: compared in the sandbox, as Python would
    ]
    assert reward.test_results(program, tests) == [False, False, True, True, True, True, True, True, True, True]


def test_decode_refuses_malformed_values():
    assert math.isnan(decode_value(["f", "nan"]))
    assert decode_value(["d", [[["t", [["i", "1"]]], ["S", [["s", "x"]]]]]]) == {(1,): {"x"}}
    for bad in (["i", 3], ["z"], [], "i", ["l", "x"], ["d", [[["l", []], ["n"]]]], ["b", 1]):
        with pytest.raises(ValueError):
            decode_value(bad)


def test_judge_takes_the_first_report_and_ignores_noise():
    plans = [plan_test("assert f() == 3"), plan_test("assert g()")]
    out = b'garbage\n{"i": 0, "values": [["i", "3"]]}\n{"i": 0, "values": [["i", "4"]]}\n{"i": 1, "passed": true}\n'
    assert judge_reports(plans, out) == [True, True]
    # a bare verdict is never accepted for a comparison with a literal
    assert judge_reports(plans, b'{"i": 0, "passed": true}\n') == [False, False]


def test_non_string_tests_are_refused_with_the_row():
    with pytest.raises(ValueError, match=r"row 1: tests\[0\] must be a string of Python code, got int"):
        CodeReward(**OPTIONS)(completions=["x = 1", "x = 1"], tests=[["assert x == 1"], [3]])
    with pytest.raises(ValueError, match="tests must be a string or a list of strings, got int"):
        normalize_tests(3)


def test_refuses_without_bwrap_unless_unsandboxed_by_name(monkeypatch):
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    reward = CodeReward(**OPTIONS)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        reward(completions=["x = 1"], tests=[["assert x == 1"]])
    with pytest.raises(SandboxUnavailableError, match='sandbox="unsandboxed"'):
        reward.check()
    assert CodeReward(**OPTIONS, sandbox="unsandboxed")(completions=["x = 1"], tests=[["assert x == 1"]]) == [1.0]
    with pytest.raises(ValueError, match="sandbox must be one of"):
        CodeReward(sandbox="none")


def test_old_bwrap_refuses_a_disk_limit_it_cannot_honour(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_version", lambda path: (0, 6, 1))
    with pytest.raises(SandboxUnavailableError, match=r"needs bubblewrap >= 0\.7\.0"):
        CodeReward(**OPTIONS).check()
    CodeReward(**OPTIONS, max_disk_mb=None).check()


def test_a_sandbox_that_cannot_start_says_why(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'bubblewrap 0.8.0' && exit 0\n"
        "echo 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: str(fake))
    with pytest.raises(SandboxUnavailableError, match="setting up uid map: Permission denied"):
        CodeReward(**OPTIONS).check()


def test_limits_inside_the_sandbox():
    program = textwrap.dedent(
        """
        import os, resource
        def limits():
            return [resource.getrlimit(r)[0] for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NPROC,
                    resource.RLIMIT_FSIZE)]
        def view():
            return sorted(os.listdir('/')), os.getuid() != 0, sorted(os.environ)
        def sees(path):
            return os.path.exists(path)
        """
    )
    repo_file = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "pyproject.toml"
    )
    reward = CodeReward(timeout=3, memory_mb=512, max_processes=8, max_file_mb=2)
    tests = [
        f"assert limits() == [{512 * 2**20}, 3, 8, {2 * 2**20}]",
        "assert view()[1] == True",
        "assert view()[2] == ['HOME', 'LANG', 'LC_ALL', 'PATH', 'PWD']",
        "assert 'etc' not in view()[0]",
        "assert 'home' not in view()[0]",
        f"assert sees({repo_file!r}) == False",  # the interpreter's prefix is bound, the checkout is not
        f"assert sees({sys.executable!r}) == True",
    ]
    assert reward.test_results(program, tests) == [True] * len(tests)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
    reason="needs root (to become an unprivileged user), setpriv and /usr/bin/python3",
)
def test_unprivileged_user_namespace_path():
    # the path every non-root trainer takes: bwrap with --unshare-user, RLIMIT_NPROC counted in the namespace.
    # The module's source goes in on the command line: the checkout may sit in a folder only root can read.
    with open(sandbox.__file__) as f:
        source = f.read()
    script = textwrap.dedent(
        f"""
        import sys, types
        m = types.ModuleType("sb"); sys.modules["sb"] = m
        exec(compile({source!r}, "sandbox.py", "exec"), m.__dict__)
        harness = m.PRELUDE + '''
        import os
        n = 0
        try:
            for _ in range(50):
                if os.fork() == 0:
                    import time; time.sleep(1); os._exit(0)
                n += 1
        except OSError:
            pass
        print(os.getuid(), sorted(os.listdir("/")), n)
        '''
        done = m.run_sandboxed(harness, b"", m.Limits(5, 2**30, 2**20, 2**24, 8), python="/usr/bin/python3",
                               python_flags=("-I", "-S"))
        print(done.returncode, done.stdout.decode().strip())
        """
    )
    out = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c", script],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    code, uid, *rest = out.stdout.split(maxsplit=2)
    assert code == "0" and uid == "65534"
    assert "'etc'" not in rest[0] and int(rest[0].rsplit(maxsplit=1)[-1]) < 8


def test_sandbox_module_stands_alone():
    # the non-root test above loads sandbox.py by path under the system python: keep it free of fastalign imports
    spec = importlib.util.find_spec("fastalign.rewards.sandbox")
    with open(spec.origin) as f:
        source = f.read()
    assert "import fastalign" not in source and "from fastalign" not in source
    assert code_execution.PRELUDE is sandbox.PRELUDE


def test_an_interpreter_under_tmp_is_not_hidden_by_the_private_tmp(tmp_path):
    # a fresh clone's virtual environment lives under /tmp, where the sandbox mounts its own tmpfs
    assert str(tmp_path).startswith("/tmp/")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    python = tmp_path / "venv" / "bin" / "python"
    python.symlink_to(os.path.realpath(sys.executable))
    reward = CodeReward(**OPTIONS, python=str(python))
    reward.check()
    program = (
        "import sys, os\ndef where():\n    return sys.executable\n"
        "def writable():\n    open('x', 'w').write('1')\n    return os.getcwd()"
    )
    assert reward.test_results(program, [f"assert where() == {str(python)!r}", "assert writable() == '/tmp'"]) == [
        True,
        True,
    ]
