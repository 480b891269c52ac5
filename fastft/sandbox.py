"""Run untrusted Python (model-written code) contained: its own process group and Linux namespaces,
resource limits, a private scratch directory, no network, a read-only view of the file system.

How a program runs (``run_program``):

* The parent writes the program to a fresh private directory and starts this file as a launcher
  (``python -I -S -B sandbox.py CONFIG``) in a new session (its own process group). On timeout the
  whole group is killed with SIGKILL.
* The launcher enters new mount, network, PID, IPC and UTS namespaces (``unshare(2)``; as a non-root
  user inside a new user namespace that maps it to itself). The network namespace has only a
  loopback device, which is down: no connection leaves it, not even to this machine's localhost.
  Its first child is PID 1 of the new PID namespace: it mounts a fresh ``/proc``, caps the PID
  namespace's ``pid_max`` (301, the kernel's minimum), mounts a size-limited tmpfs as the program's
  working directory, and remounts every other mount read-only (bind remounts: only this private
  mount namespace's view changes). When PID 1 exits, the kernel kills everything left in the PID
  namespace, so nothing the program forks or daemonises outlives it.
* PID 1 forks the program's process, which sets the resource limits (CPU time, address space, file
  size, open files, no core dumps), enters a user namespace of its own (so RLIMIT_NPROC holds even
  for root, which the kernel otherwise exempts), lowers RLIMIT_NPROC, drops every capability
  (bounding and ambient sets, no_new_privs) and executes ``python -I -S -B main.py``.
* PID 1 reaps the program (and any orphans), and reports its exit status and CPU time to the
  parent through a pipe.

When the machine refuses namespaces (no ``unshare`` permission), programs still run with the
resource limits, their own session and a fresh directory, but the network is NOT removed, the file
system is protected only by the permissions of the user running fastft, and RLIMIT_NPROC is not
enforced for root. :func:`isolation` says which holds on this machine; a warning says it once.

Linux only. The launcher part of this file imports nothing outside the standard library.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

# ---------------------------------------------------------------------------------------------------
# The launcher: runs in the child, as `python -I -S -B sandbox.py CONFIG`. Standard library only.
# ---------------------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 0x20, 0x400, 0x800, 0x1000, 0x4000
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PID_MAX_MIN = 301  # the kernel's lower bound for pid_max (RESERVED_PIDS + 1)
SANDBOX_UID = 65534  # "nobody": the program's uid outside its user namespace when fastft runs as root
_KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}


def _libc():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _mounts():
    """(mount point, per-mount options) of this mount namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # octal escapes such as \040 for a space
            out.append((point, fields[5].split(",")))
    return out


def _remount_read_only(libc, point: str, options) -> None:
    """Make this namespace's mount at ``point`` read-only, keeping its other per-mount flags.

    Always MS_REMOUNT | MS_BIND: that changes this namespace's mount, never the file system (a
    remount without MS_BIND would make the host's file system read-only for everyone)."""
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for opt in options:
        flags |= _KEEP_FLAGS.get(opt, 0)
    _mount(libc, None, point, None, flags)


def _remount_all_read_only(libc, keep_writable) -> None:
    """Make every mount of this (private) mount namespace read-only except those at ``keep_writable``;
    raise OSError naming any reachable mount left writable."""
    for point, options in _mounts():
        if point in keep_writable or "ro" in options:
            continue
        try:
            _remount_read_only(libc, point, options)
        except OSError:
            pass  # hidden under another mount, or gone: the check below judges what is reachable
    top = {}
    for point, options in _mounts():
        top[point] = options  # the last mount on a path is the one the path reaches
    writable = [p for p, o in top.items() if p not in keep_writable and "ro" not in o]
    if writable:
        raise OSError(f"could not make these mounts read-only: {writable}")


def _proc_read_only(libc) -> None:
    options = [o for p, o in _mounts() if p == "/proc"][-1]
    _remount_read_only(libc, "/proc", options)


def _drop_privileges(libc, limits: dict, uid_sync) -> None:
    """In the program's process, before exec: resource limits, a user namespace of its own, a
    non-root uid when fastft runs as root, no capabilities, no_new_privs.

    RLIMIT_NPROC never binds uid 0 (the kernel exempts root's user), so as root the program leaves
    uid 0: it makes a user namespace and PID 1 maps that namespace's root to SANDBOX_UID. The limit
    counts per (user namespace, uid) and is checked up the chain against the limit in force when
    each namespace was made, so the namespace comes first and the low limit after: it then counts
    this program's processes only."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_time"], limits["cpu_time"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory"], limits["memory"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size"], limits["file_size"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid_sync is not None:
        os.setgroups([])
    _check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    if uid_sync is not None:
        ready_w, mapped_r = uid_sync
        os.write(ready_w, b"u")
        if os.read(mapped_r, 1) != b"m":
            raise OSError("PID 1 did not map the program's user namespace")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)  # root of its namespace = SANDBOX_UID outside
        with open("/proc/self/uid_map") as f:
            if f.read().split()[:3] != ["0", str(SANDBOX_UID), "1"]:
                raise OSError("could not leave uid 0")
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
    except OSError:
        last_cap = 63
    for cap in range(last_cap + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _enter_namespaces(libc, cfg: dict) -> None:
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _setup_pid1(libc, cfg: dict) -> dict:
    """As PID 1 of the new PID namespace: private mounts, a fresh /proc, pid_max, the tmpfs working
    directory, everything else read-only. Returns what held."""
    if os.readlink("/proc/self/ns/mnt") == cfg["host_mnt_ns"]:
        raise OSError("still in the caller's mount namespace; refusing to touch its mounts")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    held = {}
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    try:
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        held["fresh_proc"] = True
    except OSError:
        held["fresh_proc"] = False
    try:
        with open("/proc/sys/kernel/pid_max", "w") as f:
            f.write(str(PID_MAX_MIN))
        held["pid_max"] = PID_MAX_MIN
    except OSError:
        held["pid_max"] = None
    work = cfg["workdir"]
    owner = f",uid={SANDBOX_UID},gid={SANDBOX_UID}" if cfg["as_root"] else ""
    _mount(libc, "tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['limits']['disk']},mode=0700{owner}")
    if cfg["python_mount"]:
        # The interpreter's folder may not be readable by SANDBOX_UID (pyenv under /root, say): show it
        # to the program under the sandbox's own folder instead (read-only like the rest).
        source, target = cfg["python_mount"]
        _mount(libc, source, target, None, MS_BIND | MS_REC)
    _remount_all_read_only(libc, keep_writable=(work, "/proc"))  # /proc: see _run_program
    held["read_only_file_system"] = True
    held["network_namespace"] = True
    held["program_uid"] = SANDBOX_UID if cfg["as_root"] else "the caller's (in a user namespace)"
    held["nproc_enforced"] = True
    return held


def _run_program(libc, cfg: dict, status_fd: int, held: dict) -> None:
    """Fork the program, wait for it (reaping orphans too when PID 1), report, exit."""
    drop_root = cfg["isolated"] and cfg["as_root"]
    if cfg["isolated"] and not drop_root:
        _proc_read_only(libc)
    ready_r, ready_w = os.pipe() if drop_root else (None, None)
    mapped_r, mapped_w = os.pipe() if drop_root else (None, None)
    child = os.fork()
    if child == 0:
        try:
            os.close(status_fd)
            for fd in (ready_r, mapped_w):
                if fd is not None:
                    os.close(fd)
            os.chdir(cfg["workdir"])
            if cfg["isolated"]:
                _drop_privileges(libc, cfg["limits"], (ready_w, mapped_r) if drop_root else None)
                for fd in (ready_w, mapped_r):
                    if fd is not None:
                        os.close(fd)
            else:
                lim = cfg["limits"]
                resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_time"], lim["cpu_time"] + 1))
                resource.setrlimit(resource.RLIMIT_AS, (lim["memory"], lim["memory"]))
                resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_size"], lim["file_size"]))
                resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"], lim["open_files"]))
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
            os.execve(cfg["exec_python"], [cfg["exec_python"], "-I", "-S", "-B", cfg["program"]], cfg["env"])
        except BaseException as e:  # noqa: BLE001 - report anything, then leave without cleanup
            os.write(2, f"fastft.sandbox: could not start the program: {e!r}\n".encode())
        os._exit(127)
    if drop_root:
        # /proc stays writable until PID 1 has written the program's uid/gid maps, and is read-only
        # before the program goes on ("m"); without "m" the program stops.
        os.close(ready_w)
        os.close(mapped_r)
        if os.read(ready_r, 1) == b"u":
            try:
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{child}/{name}", "w") as f:
                        f.write(f"0 {SANDBOX_UID} 1")
                _proc_read_only(libc)
                os.write(mapped_w, b"m")
            except OSError as e:
                os.write(2, f"fastft.sandbox: could not map the program's user namespace: {e!r}\n".encode())
        os.close(ready_r)
        os.close(mapped_w)
    while True:
        pid, status = os.wait()
        if pid == child:
            break
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = {"isolation": held, "cpu_s": usage.ru_utime + usage.ru_stime}
    if os.WIFSIGNALED(status):
        report["signal"] = os.WTERMSIG(status)
    else:
        report["exit"] = os.WEXITSTATUS(status)
    os.write(status_fd, json.dumps(report).encode())
    os._exit(0)


def _launch(cfg: dict) -> None:
    status_fd = cfg["status_fd"]
    libc = _libc()
    try:
        if cfg["isolated"]:
            _enter_namespaces(libc, cfg)
            pid1 = os.fork()  # the first child of a new PID namespace is its PID 1
            if pid1:
                # The parent stops a program with SIGTERM to this process: it kills PID 1, the kernel
                # then kills the rest of the namespace, and waitpid returns once all of it is gone.
                signal.signal(signal.SIGTERM, lambda *_: os.kill(pid1, signal.SIGKILL))
                _, status = os.waitpid(pid1, 0)
                os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)
            held = _setup_pid1(libc, cfg)
        else:
            held = {}
    except Exception as e:  # noqa: BLE001 - the parent turns this into a SandboxError
        os.write(status_fd, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        os._exit(125)
    _run_program(libc, cfg, status_fd, held)


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))

# ---------------------------------------------------------------------------------------------------
# The parent side: the public API.
# ---------------------------------------------------------------------------------------------------

import functools  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

__all__ = ["Limits", "SandboxResult", "SandboxError", "run_program", "run_programs", "isolation", "ensure_isolation"]

_LAUNCHER = os.path.abspath(__file__)


class SandboxError(RuntimeError):
    """The sandbox could not be set up (not a failure of the program it was to run)."""


@dataclass(frozen=True)
class Limits:
    """What one program may use.

    Attributes:
        timeout: wall-clock seconds before its process group is killed (float > 0).
        cpu_time: CPU seconds (RLIMIT_CPU, whole seconds, rounded up); None = ``ceil(timeout)``.
        memory: address space in bytes (RLIMIT_AS) of each of its processes; default 1 GiB.
        file_size: largest file it may write, bytes (RLIMIT_FSIZE); default 16 MiB.
        disk: size of its tmpfs working directory, bytes; default 64 MiB (isolated mode only).
        processes: processes and threads it may have at once (RLIMIT_NPROC); default 16.
        open_files: file descriptors (RLIMIT_NOFILE); default 64.
        output: bytes of stdout + stderr before it is killed; default 1 MiB. The result keeps the
            first ``keep`` bytes of stdout and the last ``keep`` bytes of stderr.
        keep: see ``output``; default 8 KiB.
    """

    timeout: float = 10.0
    cpu_time: Optional[int] = None
    memory: int = 1 << 30
    file_size: int = 16 << 20
    disk: int = 64 << 20
    processes: int = 16
    open_files: int = 64
    output: int = 1 << 20
    keep: int = 8 << 10

    def __post_init__(self) -> None:
        if not isinstance(self.timeout, (int, float)) or not self.timeout > 0:
            raise ValueError(f"fastft.sandbox.Limits: timeout must be a positive number of seconds, got "
                             f"{self.timeout!r}")
        for name in ("memory", "file_size", "disk", "processes", "open_files", "output", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"fastft.sandbox.Limits: {name} must be a positive int, got {value!r}")
        if self.cpu_time is not None and (not isinstance(self.cpu_time, int) or self.cpu_time < 1):
            raise ValueError(f"fastft.sandbox.Limits: cpu_time must be a positive int (seconds) or None, got "
                             f"{self.cpu_time!r}")
        if self.memory < 64 << 20:
            raise ValueError(f"fastft.sandbox.Limits: memory={self.memory} bytes is too small for a Python "
                             "interpreter to start; give at least 64 MiB (64 << 20)")

    def resolved(self) -> dict:
        d = asdict(self)
        d["cpu_time"] = self.cpu_time or max(1, math.ceil(self.timeout))
        return d


@dataclass
class SandboxResult:
    """How one program ended.

    Attributes:
        passed: True when it exited with status 0 within every limit.
        status: ``"passed"``, ``"failed"`` (non-zero exit, e.g. a failed assertion), ``"timeout"``
            (wall time), ``"cpu_limit"``, ``"memory_limit"`` (MemoryError under RLIMIT_AS),
            ``"file_size_limit"``, ``"disk_limit"`` (its tmpfs is full), ``"process_limit"`` (it died of
            a refused fork), ``"output_limit"``, ``"signal"`` (killed by another signal). The
            ``*_limit`` statuses from an exception are read off the last line of its stderr.
        reason: one line saying why it failed ("" when passed), e.g. the exception's last line.
        returncode: its exit status, or minus the signal that killed it; None when killed on timeout
            or for its output.
        stdout, stderr: the start of its stdout and the end of its stderr (``Limits.keep`` bytes
            each, decoded as UTF-8 with replacement).
        wall_time: seconds from start to end; cpu_time: CPU seconds of it and its children (None
            when it was killed before reporting).
    """

    passed: bool
    status: str
    reason: str
    returncode: Optional[int]
    stdout: str = ""
    stderr: str = ""
    wall_time: float = 0.0
    cpu_time: Optional[float] = None
    isolation: Dict[str, object] = field(default_factory=dict)


def _host_mnt_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return ""


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping the head (or tail) and counting bytes; calls ``over`` once the
    shared byte count passes the output limit."""

    def __init__(self, stream, keep: int, tail: bool, counter: list, limit: int, over) -> None:
        super().__init__(daemon=True)
        self.stream, self.keep, self.tail, self.counter, self.limit, self.over = stream, keep, tail, counter, limit, over
        self.data = bytearray()

    def run(self) -> None:
        while True:
            chunk = self.stream.read1(1 << 16) if hasattr(self.stream, "read1") else self.stream.read(1 << 16)
            if not chunk:
                return
            self.counter[0] += len(chunk)
            if self.tail:
                self.data += chunk
                del self.data[:-self.keep]
            elif len(self.data) < self.keep:
                self.data += chunk[:self.keep - len(self.data)]
            if self.counter[0] > self.limit:
                self.over()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher and everything it started: SIGTERM first (an isolated launcher then kills its
    PID namespace and reaps it), SIGKILL to the whole process group after at most 5 s either way."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5.0)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    _kill_group(proc.pid)
    proc.wait()


def _launch_and_wait(source: str, limits: Limits, isolated: bool, python: str) -> SandboxResult:
    lim = limits.resolved()
    base = tempfile.mkdtemp(prefix="fastft-sandbox-")
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        program = os.path.join(base, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        exec_python, python_mount = python, None
        if isolated and os.geteuid() == 0:  # the program runs as SANDBOX_UID: it must reach its files
            os.chmod(base, 0o755)
            os.chmod(program, 0o644)
            real = os.path.realpath(python)
            if not _others_can_reach(real):
                prefix = os.path.dirname(os.path.dirname(real))
                python_mount = [prefix, os.path.join(base, "python")]
                os.mkdir(python_mount[1], 0o755)
                exec_python = os.path.join(python_mount[1], os.path.relpath(real, prefix))
                env["LD_LIBRARY_PATH"] = os.path.join(python_mount[1], "lib")
        read_fd, write_fd = os.pipe()
        cfg = {"status_fd": write_fd, "isolated": isolated, "workdir": work, "program": program,
               "exec_python": exec_python, "python_mount": python_mount, "env": env, "limits": lim,
               "host_mnt_ns": _host_mnt_ns(), "as_root": os.geteuid() == 0}
        start = time.monotonic()
        try:
            proc = subprocess.Popen([python, "-I", "-S", "-B", _LAUNCHER, json.dumps(cfg)], cwd=base,
                                    env={"PATH": env["PATH"], "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,),
                                    start_new_session=True)
        finally:
            os.close(write_fd)
        killed_for: List[str] = []

        def over_output() -> None:
            if not killed_for:
                killed_for.append("output")
                _stop(proc)

        counter = [0]
        out = _Drain(proc.stdout, lim["keep"], False, counter, lim["output"], over_output)
        err = _Drain(proc.stderr, lim["keep"], True, counter, lim["output"], over_output)
        out.start()
        err.start()
        status_chunks = []
        status_reader = threading.Thread(target=lambda: status_chunks.append(_read_all(read_fd)), daemon=True)
        status_reader.start()
        try:
            proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            if not killed_for:
                killed_for.append("timeout")
            _stop(proc)
        _kill_group(proc.pid)  # whatever of its group is left (the PID namespace dies with its PID 1)
        wall = time.monotonic() - start
        for t in (out, err, status_reader):
            t.join(timeout=5.0)
        _wait_group_gone(proc.pid)
        raw = status_chunks[0] if status_chunks else b""
        report = json.loads(raw) if raw else {}
        if "error" in report:
            raise SandboxError(f"fastft.sandbox: could not isolate the program: {report['error']}")
        return _result(report, killed_for, limits, lim, out, err, wall)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _others_can_reach(path: str) -> bool:
    """Whether a user without privileges may walk to ``path`` (every folder above it searchable by others)."""
    import stat

    folder = os.path.dirname(path)
    while True:
        try:
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        if folder == os.path.dirname(folder):
            return True
        folder = os.path.dirname(folder)


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _wait_group_gone(pgid: int, within: float = 5.0) -> None:
    """Until no process of the group is left (PID 1 of a namespace exits after it has reaped all)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _result(report: dict, killed_for: List[str], limits: Limits, lim: dict, out: _Drain, err: _Drain,
            wall: float) -> SandboxResult:
    stdout = out.data.decode("utf-8", "replace")
    stderr = err.data.decode("utf-8", "replace")
    cpu = report.get("cpu_s")
    common = dict(stdout=stdout, stderr=stderr, wall_time=wall, cpu_time=cpu, isolation=report.get("isolation", {}))
    if killed_for and killed_for[0] == "timeout":
        return SandboxResult(False, "timeout", f"wall-time limit: still running after {limits.timeout:g} s, "
                             "killed with its process group", None, **common)
    if killed_for and killed_for[0] == "output":
        return SandboxResult(False, "output_limit", f"output limit: printed more than {lim['output']} bytes, killed",
                             None, **common)
    if "signal" in report:
        sig = report["signal"]
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None and cpu >= lim["cpu_time"]):
            return SandboxResult(False, "cpu_limit", f"CPU-time limit of {lim['cpu_time']} s ({name})", -sig,
                                 **common)
        if sig == signal.SIGXFSZ:
            return SandboxResult(False, "file_size_limit", f"file-size limit of {lim['file_size']} bytes ({name})",
                                 -sig, **common)
        return SandboxResult(False, "signal", f"killed by {name}", -sig, **common)
    if "exit" not in report:
        return SandboxResult(False, "signal", "the sandbox's process died without reporting", None, **common)
    code = report["exit"]
    if code == 0:
        return SandboxResult(True, "passed", "", 0, **common)
    last = _last_line(stderr)
    if last.startswith("MemoryError"):
        return SandboxResult(False, "memory_limit", f"memory limit of {lim['memory']} bytes (MemoryError)", code,
                             **common)
    # Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE raises EFBIG; fork past RLIMIT_NPROC, EAGAIN.
    for marker, status, what in (("[Errno 27]", "file_size_limit", f"file-size limit of {lim['file_size']} bytes"),
                                 ("[Errno 28]", "disk_limit", f"working-directory size limit of {lim['disk']} bytes"),
                                 ("BlockingIOError: [Errno 11]", "process_limit",
                                  f"process limit of {lim['processes']}")):
        if marker in last:
            return SandboxResult(False, status, f"{what} ({last})", code, **common)
    return SandboxResult(False, "failed", last or f"exit status {code}", code, **common)


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> Dict[str, object]:
    try:
        r = _launch_and_wait("pass\n", Limits(timeout=30.0), True, python)
        if r.passed:
            return {"isolated": True, **r.isolation}
        why = f"the isolated launcher failed ({r.reason})"
    except SandboxError as e:
        why = str(e)
    return {"isolated": False, "why": why}


def isolation(python: Optional[str] = None) -> Dict[str, object]:
    """What this machine lets the sandbox enforce (probed once per interpreter, by running an empty
    program).

    Returns a dict: ``isolated`` (True when the namespaces, read-only mounts and tmpfs working
    directory are in force) and, when isolated, ``fresh_proc``, ``pid_max`` (the PID namespace's
    cap, or None where refused), ``read_only_file_system``, ``network_namespace``; otherwise
    ``why`` (the error that stopped it). Resource limits (CPU, address space, file size, open files,
    processes) are set either way; RLIMIT_NPROC binds root only when isolated.
    """
    return dict(_probe(python or sys.executable))


_warned = []


def ensure_isolation(require: bool = True, python: Optional[str] = None) -> bool:
    """True when programs will run isolated (see :func:`isolation`). When the machine refuses the
    namespaces: raise SandboxError if ``require`` (nothing should run), else warn once and return False."""
    python = python or sys.executable
    info = _probe(python)
    if info["isolated"]:
        return True
    if require:
        raise SandboxError(f"fastft.sandbox: this machine refuses the sandbox's Linux namespaces ({info['why']}), so "
                           "programs would run without network removal and with write access to whatever this user "
                           "may write. Pass require_isolation=False to run them anyway with resource limits, their "
                           "own process group and a fresh directory only")
    if not _warned:
        _warned.append(True)
        warnings.warn(f"fastft.sandbox: running programs WITHOUT isolation ({info['why']}): resource limits, their own "
                      "process group and a fresh directory only; the network is NOT removed, the file system is "
                      "protected only by this user's permissions, and RLIMIT_NPROC does not bind root",
                      RuntimeWarning, stacklevel=3)
    return False


def _check_source(source, where: str) -> None:
    if not isinstance(source, str):
        raise TypeError(f"fastft.sandbox.{where}: a program is Python source text (str), got {type(source).__name__}")


def run_program(source: str, limits: Optional[Limits] = None, *, python: Optional[str] = None,
                require_isolation: bool = True) -> SandboxResult:
    """Run the Python program ``source`` in the sandbox (see the module docstring) and say how it ended.

    Args:
        source: the program's text, run as ``python -I -S -B main.py`` (isolated mode: no site
            packages, no environment variables from the caller, no bytecode written).
        limits: a :class:`Limits`; default ``Limits()`` (10 s wall time, 1 GiB address space, ...).
        python: the interpreter; default ``sys.executable``.
        require_isolation: when True (default) and this machine refuses the namespaces (see
            :func:`isolation`), raise SandboxError instead of running; False runs the program with
            the resource limits, its own process group and a fresh directory only, and warns once.

    Returns:
        A :class:`SandboxResult`. A program that fails, hangs, forks without bound, allocates too
        much or prints too much is a result (``passed=False`` with its ``status`` and ``reason``),
        never an exception.

    Raises:
        TypeError: ``source`` is not a str. SandboxError: isolation is unavailable and required, or
        it was available when probed but could not be set up for this program (fail closed: the
        program did not run).
    """
    _check_source(source, "run_program")
    limits = limits if limits is not None else Limits()
    python = python or sys.executable
    return _launch_and_wait(source, limits, ensure_isolation(require_isolation, python), python)


def run_programs(sources: Sequence[str], limits: Optional[Limits] = None, *, workers: Optional[int] = None,
                 python: Optional[str] = None, require_isolation: bool = True) -> List[SandboxResult]:
    """:func:`run_program` on each of ``sources``, ``workers`` at a time (default: the number of CPU
    cores this process may use), each in a sandbox of its own. Returns the results in the order of
    ``sources``; raises as :func:`run_program` does (before running any program)."""
    sources = list(sources)
    for s in sources:
        _check_source(s, "run_programs")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"fastft.sandbox.run_programs: workers must be a positive int or None, got {workers!r}")
    limits = limits if limits is not None else Limits()
    python = python or sys.executable
    isolated = ensure_isolation(require_isolation, python)
    workers = workers or len(os.sched_getaffinity(0))
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(sources))) as pool:
        return list(pool.map(lambda s: _launch_and_wait(s, limits, isolated, python), sources))
