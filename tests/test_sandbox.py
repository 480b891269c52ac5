"""fastft.sandbox: hostile programs are contained, reported as failures with their reason, and leave the
parent and the file system as they were.

The hostile tests run only where the sandbox is isolated (namespaces available): elsewhere they skip,
since an un-isolated fork bomb or file deletion would hit the machine running the tests."""

import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest

from fastft import sandbox
from fastft.sandbox import Limits, SandboxError, run_program, run_programs

ISOLATION = sandbox.isolation()
isolated = pytest.mark.skipif(not ISOLATION["isolated"], reason=f"no isolation here: {ISOLATION.get('why')}")


def _prog(src: str) -> str:
    return textwrap.dedent(src).lstrip()


def _sandbox_processes() -> list:
    """PIDs on this machine that run as the sandbox's uid (or whose command line is a sandboxed program)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                uid_line = next(line for line in f if line.startswith("Uid:"))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, StopIteration):
            continue
        if uid_line.split()[1] == str(sandbox.SANDBOX_UID) or b"fastft-sandbox-" in cmd:
            out.append(int(pid))
    return out


def _parent_unharmed() -> None:
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "42"


def test_limits_are_checked_up_front():
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=0)
    with pytest.raises(ValueError, match="memory"):
        Limits(memory=1 << 20)
    with pytest.raises(ValueError, match="processes"):
        Limits(processes=0)
    with pytest.raises(TypeError, match="str"):
        run_program(b"print(1)")
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], workers=0)


@isolated
def test_a_plain_program_passes_and_a_failing_one_says_why():
    ok = run_program("import math\nprint(math.factorial(5))\n")
    assert ok.passed and ok.status == "passed" and ok.stdout == "120\n" and ok.returncode == 0
    bad = run_program("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not bad.passed and bad.status == "failed" and bad.reason == "AssertionError: arithmetic"
    syntax = run_program("def f(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.reason


@isolated
def test_isolation_report_names_what_holds():
    assert ISOLATION["network_namespace"] and ISOLATION["read_only_file_system"] and ISOLATION["nproc_enforced"]
    assert ISOLATION["pid_max"] == sandbox.PID_MAX_MIN


@isolated
def test_infinite_loop_is_killed_at_the_wall_time_limit():
    r = run_program("while True:\n    pass\n", Limits(timeout=1.5, cpu_time=30))
    assert r.status == "timeout" and not r.passed and "wall-time" in r.reason and r.returncode is None
    assert _sandbox_processes() == []


@isolated
def test_cpu_time_limit():
    r = run_program("while True:\n    pass\n", Limits(timeout=20, cpu_time=1))
    assert r.status == "cpu_limit" and "CPU-time" in r.reason and r.returncode == -24  # SIGXCPU


@isolated
def test_a_bounded_fork_loop_stops_at_the_process_limit():
    # The containment checked with a loop that ends by itself, before the real fork bomb below.
    r = run_program(_prog("""
        import os, time
        forked = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except BlockingIOError:
                break
            if pid == 0:
                time.sleep(2)
                os._exit(0)
            forked += 1
        print(forked)
        """), Limits(timeout=10, processes=8))
    assert r.passed and int(r.stdout) == 7  # 8 processes: the program and 7 children
    assert _sandbox_processes() == []


@isolated
def test_fork_bomb_is_contained():
    before = _sandbox_processes()
    r = run_program(_prog("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """), Limits(timeout=2, processes=16))
    assert not r.passed and r.status == "timeout"
    assert before == [] and _sandbox_processes() == []  # nothing of it outlives the run
    _parent_unharmed()


@isolated
def test_a_daemonised_grandchild_dies_with_the_program():
    r = run_program(_prog("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        print("parent left")
        """), Limits(timeout=5))
    assert r.passed and r.stdout == "parent left\n"
    assert _sandbox_processes() == []


@isolated
def test_a_10_gb_allocation_fails_with_memory_limit():
    r = run_program("block = bytearray(10 * 1024 ** 3)\n", Limits(memory=512 << 20))
    assert r.status == "memory_limit" and "MemoryError" in r.reason and not r.passed
    _parent_unharmed()


@isolated
def test_files_outside_its_directory_are_read_only(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    target = tmp_path / "new.txt"
    r = run_program(_prog(f"""
        import os, shutil
        open("mine.txt", "w").write("fine")  # its own directory is writable
        assert open("mine.txt").read() == "fine"
        for attempt in (lambda: open({str(target)!r}, "w").write("x"),
                        lambda: open({str(keep)!r}, "w").write("overwritten"),
                        lambda: open(os.path.expanduser("~/../escaped.txt"), "w"),
                        lambda: shutil.rmtree({str(tmp_path)!r})):
            try:
                attempt()
            except OSError:
                pass
        os.remove({str(keep)!r})
        """))
    assert not r.passed and r.status == "failed"
    assert "Read-only file system" in r.reason or "Permission denied" in r.reason
    assert keep.read_text() == "precious" and not target.exists() and sorted(os.listdir(tmp_path)) == ["keep.txt"]


@isolated
def test_its_directory_is_fresh_and_removed_afterwards():
    first = run_program("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())\n")
    second = run_program("import os\nprint(os.listdir('.'))\n")
    assert first.passed and second.passed and second.stdout == "[]\n"
    assert not os.path.exists(os.path.dirname(first.stdout.strip()))


@isolated
def test_no_network_not_even_this_machines_localhost():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = run_program(_prog(f"""
            import socket
            socket.create_connection(("127.0.0.1", {port}), timeout=2)
            """), Limits(timeout=10))
        assert not r.passed and r.status == "failed" and "Network is unreachable" in r.reason
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


@isolated
def test_printing_megabytes_is_cut_off():
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                    Limits(timeout=20, output=1 << 20, keep=1000))
    assert r.status == "output_limit" and not r.passed and len(r.stdout) == 1000


@isolated
def test_file_size_and_disk_limits():
    big = "f = open('big', 'wb')\nfor _ in range(64):\n    f.write(b'x' * (1 << 20))\n    f.flush()\n"
    r = run_program(big, Limits(file_size=1 << 20))
    assert r.status == "file_size_limit" and "File too large" in r.reason
    r = run_program(big, Limits(file_size=1 << 30, disk=8 << 20))
    assert r.status == "disk_limit" and "No space left" in r.reason


@isolated
def test_no_capabilities_and_no_way_to_signal_the_machine():
    r = run_program(_prog("""
        import os
        caps = {l.split(':')[0]: int(l.split()[1], 16) for l in open('/proc/self/status') if l.startswith('Cap')}
        assert all(v == 0 for v in caps.values()), caps
        assert sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1, os.getpid()]
        """))
    assert r.passed, r.reason


@isolated
def test_parallel_runs_keep_their_order_and_a_bomb_does_not_starve_its_neighbours():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    forks = ("import os\nkids = [os.fork() for _ in range(6)]\nif 0 in kids:\n    os._exit(0)\n"
             "for _ in kids:\n    os.wait()\nprint({})\n")
    sources = [forks.format(i) for i in range(3)] + [bomb] + [forks.format(i) for i in range(3, 6)]
    results = run_programs(sources, Limits(timeout=3, processes=64), workers=2)
    assert [r.status for r in results] == ["passed"] * 3 + ["timeout"] + ["passed"] * 3
    assert [int(r.stdout) for i, r in enumerate(results) if i != 3] == [0, 1, 2, 3, 4, 5]
    assert _sandbox_processes() == []


def test_without_isolation_nothing_runs_unless_asked(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe", lambda python: {"isolated": False, "why": "test"})
    monkeypatch.setattr(sandbox, "_warned", [])
    with pytest.raises(SandboxError, match="require_isolation=False"):
        run_program("print(1)")
    with pytest.raises(SandboxError):
        run_programs(["print(1)"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_program("print(1)\n", require_isolation=False)
    assert r.passed and r.stdout == "1\n"
    assert any("WITHOUT isolation" in str(w.message) for w in caught)


UNPRIVILEGED_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sandbox
fork = ("import os, time\\nn = 0\\nfor _ in range(20):\\n    try:\\n        p = os.fork()\\n    except BlockingIOError:\\n"
        "        break\\n    if p == 0:\\n        time.sleep(1)\\n        os._exit(0)\\n    n += 1\\nprint(n)\\n")
out = {"isolation": sandbox.isolation(),
       "fork": sandbox.run_program(fork, sandbox.Limits(processes=6)).stdout,
       "net": sandbox.run_program("import socket\\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\\n").reason,
       "write": sandbox.run_program("open(%r, 'w').write('x')\\n" % (sys.argv[1] + '/escaped',)).reason}
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root, setpriv and a system python to try the unprivileged path")
def test_an_unprivileged_user_gets_the_same_isolation(tmp_path):
    import json
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="fastft-sandbox-test-")
    try:
        os.chmod(folder, 0o777)
        shutil.copy(sandbox.__file__, folder)
        with open(os.path.join(folder, "driver.py"), "w") as f:
            f.write(UNPRIVILEGED_DRIVER)
        for name in os.listdir(folder):
            os.chmod(os.path.join(folder, name), 0o644)
        run = subprocess.run(["/usr/bin/setpriv", f"--reuid={sandbox.SANDBOX_UID}", f"--regid={sandbox.SANDBOX_UID}",
                              "--clear-groups", "/usr/bin/python3", os.path.join(folder, "driver.py"), folder],
                             capture_output=True, text=True, timeout=120, cwd="/")
        if "refuses" in run.stderr or run.returncode != 0 and "SandboxError" in run.stderr:
            pytest.skip(f"no user namespaces for unprivileged users here: {run.stderr[-300:]}")
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["isolation"]["isolated"] and out["isolation"]["nproc_enforced"]
        assert out["fork"].strip() == "5"  # RLIMIT_NPROC binds inside its user namespace
        assert "Network is unreachable" in out["net"]
        assert "Read-only file system" in out["write"] and not os.path.exists(os.path.join(folder, "escaped"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
