"""Running untrusted Python (a model's completion plus a benchmark's tests) in a contained process.

Layers, from the operating system's to the interpreter's (docs/code_generation.md says what
they do not stop):

- a separate process, `python -I -S` (isolated: no environment variables, no user or site
  packages), started in a new session so that one `killpg` reaches its whole process group,
  with an empty environment, stdin from /dev/null and a fresh temporary directory as cwd;
- resource limits: CPU seconds, address space, file size, processes, open files, no core files;
- a wall-clock timeout, after which the process group is killed; it is killed after every
  check in any case;
- when the evaluator runs as root: the program runs as an unprivileged user (`nobody`), in new
  network and PID namespaces: no network interface but a down loopback, and when the
  namespace's first process exits the kernel kills every process left in it;
- an audit hook installed before the program runs refuses sockets, signals to other
  processes, new processes, ctypes, and opening or changing files outside the temporary
  directory and the standard library (an extra layer: audit hooks are not a security boundary).

Only the standard library is importable: the benchmarks' programs need nothing else.

It is long because it is one security boundary: the launcher, the limits, the privilege
drop, the audit hook and the clean-up are read and reviewed together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coreinfer_jax.errors import CoreInferError

_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000

# Started by `subprocess` (not a `preexec_fn`: forking a multithreaded evaluator, JAX's, and
# running Python before exec can deadlock), as the evaluator's user: enters the namespaces, sets
# the limits, drops to the unprivileged user, then runs the wrapper in its place.
# argv = [namespaces 0/1, uid, gid, then the limits as resource=value..., "--", wrapper argv...].
LAUNCHER = r'''
import os, resource, sys
end = sys.argv.index("--")
namespaces, uid, gid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if namespaces:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).unshare(%d) != 0:
        sys.exit(f"sandbox: unshare failed: {os.strerror(ctypes.get_errno())}")
for item in sys.argv[4:end]:
    name, value = item.split("=")
    resource.setrlimit(getattr(resource, name), (int(value), int(value)))
if uid >= 0:  # last: the namespaces and limits above need root
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
os.execv(sys.executable, [sys.executable, "-I", "-S", "-c"] + sys.argv[end + 1:])
''' % (_CLONE_NEWNET | _CLONE_NEWPID)

# Run by the sandboxed interpreter: argv = [program path, outcome fd, "fork" or "nofork",
# "hook" or "nohook"].
# With a PID namespace it forks once, so that the program runs as the namespace's first
# process and the kernel kills whatever it leaves behind when it exits. The outcome (passed,
# or the exception's type) goes to its own pipe: the program's output cannot fake it by accident.
WRAPPER = r'''
import json, os, sys, sysconfig, traceback
path, result_fd, fork, audit = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fork", sys.argv[4] == "hook"
source = open(path, encoding="utf-8").read()
if fork:
    pid = os.fork()
    if pid:
        os.close(result_fd)
        status = os.waitpid(pid, 0)[1]
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
home = os.path.realpath(os.getcwd())
readable = tuple(os.path.realpath(p) for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})
def inside(p, roots):
    if isinstance(p, int):
        return True
    p = os.path.realpath(os.fsdecode(p))
    return any(p == r or p.startswith(r + os.sep) for r in roots)
BLOCKED = ("os.kill", "os.killpg", "signal.pthread_kill", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
           "os.exec", "os.system", "os.startfile", "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym",
           "sys.remote_exec")
CHANGES = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.replace": 2, "os.link": 2, "os.symlink": 2,
           "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.mkdir": 1, "os.utime": 1, "shutil.rmtree": 1}
LISTS = ("os.listdir", "os.scandir")
def hook(event, args):
    if event.startswith("socket.") or event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        writing = args[1] is not None and any(c in args[1] for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)
        if not inside(args[0], (home,) if writing else (home,) + readable):
            raise PermissionError(f"sandbox: opening {args[0]!r} is not allowed")
    elif event in LISTS and not inside(args[0] or ".", (home,) + readable):
        raise PermissionError(f"sandbox: listing {args[0]!r} is not allowed")
    elif event in CHANGES and not all(inside(a, (home,)) for a in args[:CHANGES[event]] if a is not None):
        raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
if audit:
    sys.addaudithook(hook)
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
except BaseException as e:
    traceback.print_exc()
    outcome = {"passed": False, "error": type(e).__name__}
else:
    outcome = {"passed": True, "error": None}
os.write(result_fd, json.dumps(outcome).encode())
'''


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 10.0  # wall clock, from start to the last byte of output and exit
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 1 << 20  # largest file it may write
    processes: int = 8  # per user id: the sandbox user's (the evaluator's own when not root)
    open_files: int = 32
    output_bytes: int = 4096  # stdout + stderr kept, the rest read and dropped

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_bytes", "file_bytes", "processes", "open_files", "output_bytes"):
            if getattr(self, name) <= 0:
                raise CoreInferError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass
class Outcome:
    """How one program ended. `reason`: "passed", "failed: AssertionError" (an assertion of
    the tests), "error: NameError" (any other exception), "timeout", "killed: SIGXCPU" (a
    signal, e.g. a resource limit), "exit: 3" (it exited without reaching the end, or reached
    it and then exited with an error code)."""

    passed: bool
    reason: str
    output: str
    seconds: float


def _others_can_reach(path: Path) -> bool:
    """Whether a user with no relation to the owner can traverse to and run `path`."""
    path = Path(os.path.realpath(path))
    if not path.stat().st_mode & stat.S_IXOTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)


@dataclasses.dataclass(frozen=True)
class Isolation:
    """The layers available to this evaluator: decided once per process."""

    user: str | None  # the unprivileged user programs run as, None when the evaluator is not root
    uid: int
    gid: int
    namespaces: bool  # new network and PID namespaces
    python: str

    def describe(self) -> dict[str, object]:
        return {"user": self.user, "namespaces": self.namespaces, "python": self.python}


def _unshare_works() -> bool:
    """Whether this process may create network and PID namespaces (root, and not forbidden by
    a container's seccomp profile): tried in a throwaway child."""
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c",
                               f"import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare("
                               f"{_CLONE_NEWNET | _CLONE_NEWPID}) != 0)"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


_ISOLATION: Isolation | None = None


def isolation() -> Isolation:
    global _ISOLATION
    if _ISOLATION is None:
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            # The unprivileged user must be able to run the interpreter: the evaluator's own may
            # sit under a private home directory (pyenv under /root).
            candidates = [sys.executable, sys._base_executable, shutil.which("python3", path="/usr/bin:/bin")]
            python = next((p for p in candidates if p and _others_can_reach(Path(p))), None)
            if python is None:
                raise CoreInferError("code execution as root needs a Python interpreter that user nobody can run "
                                     f"(none of {', '.join(p for p in candidates if p)} is)")
            _ISOLATION = Isolation("nobody", user.pw_uid, user.pw_gid, _unshare_works(), python)
        else:
            _ISOLATION = Isolation(None, -1, -1, False, sys.executable)
    return _ISOLATION


def _launch_args(limits: Limits, iso: Isolation) -> list[str]:
    rlimits = {"RLIMIT_CPU": limits.cpu_s, "RLIMIT_AS": limits.memory_bytes, "RLIMIT_FSIZE": limits.file_bytes,
               "RLIMIT_NPROC": limits.processes, "RLIMIT_NOFILE": limits.open_files, "RLIMIT_CORE": 0}
    return ([str(int(iso.namespaces)), str(iso.uid), str(iso.gid)] + [f"{k}={v}" for k, v in rlimits.items()]
            + ["--"])


def _reason(returncode: int, result: bytes, timed_out: bool) -> tuple[bool, str]:
    if timed_out:
        return False, "timeout"
    if returncode < 0 or returncode > 128:  # a signal, directly or relayed by the namespace's parent
        number = -returncode if returncode < 0 else returncode - 128
        try:
            return False, f"killed: {signal.Signals(number).name}"
        except ValueError:
            return False, f"killed: signal {number}"
    try:
        outcome = json.loads(result)
        passed, error = bool(outcome["passed"]), outcome["error"]
    except (ValueError, KeyError, TypeError):
        return False, f"exit: {returncode}"
    if passed and returncode == 0:
        return True, "passed"
    if passed:  # the tests ran to their end, then the process exited with an error code
        return False, f"exit: {returncode}"
    return False, f"failed: {error}" if error == "AssertionError" else f"error: {error}"


def run_program(source: str, limits: Limits = Limits(), audit_hook: bool = True) -> Outcome:
    """Run `source` as a Python program in the sandbox; it passes when it runs to its end.
    `audit_hook=False` leaves out the interpreter layer (to test the others alone)."""
    iso = isolation()
    start = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="coreinfer-sandbox-"))
    try:
        program = home / "program.py"
        program.write_text(source, encoding="utf-8")
        if iso.user is not None:
            os.chown(home, iso.uid, iso.gid)
            os.chown(program, iso.uid, iso.gid)
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(
                [iso.python, "-I", "-S", "-c", LAUNCHER, *_launch_args(limits, iso), WRAPPER, str(program),
                 str(write_end), "fork" if iso.namespaces else "nofork", "hook" if audit_hook else "nohook"],
                cwd=home, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=(write_end,), start_new_session=True)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        try:
            output, timed_out = _read_output(proc, limits, start + limits.timeout_s)
            if not timed_out:
                try:
                    proc.wait(timeout=max(0.0, start + limits.timeout_s - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            _kill_group(proc)
        with os.fdopen(read_end, "rb") as f:
            result = f.read(1 << 16)
        passed, reason = _reason(proc.returncode, result, timed_out)
        return Outcome(passed, reason, output.decode("utf-8", "replace"), time.monotonic() - start)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _read_output(proc: subprocess.Popen, limits: Limits, deadline: float) -> tuple[bytes, bool]:
    """The first `output_bytes` of the program's output, reading (and dropping) the rest until
    every writer has closed it; True when the deadline came first."""
    kept = bytearray()
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(kept), True
            if not sel.select(left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return bytes(kept), False
            kept += chunk[: max(0, limits.output_bytes - len(kept))]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Kill everything the program started and wait until it is gone. The namespace's first
    process is killed by pid (it may have left the process group with setsid), which makes the
    kernel kill the rest of its namespace; then the process group."""
    targets = [proc.pid] + _children(proc.pid)
    for pid in targets[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = False
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            alive = True
        except ProcessLookupError:
            pass
        proc.poll()  # reaps the wrapper, our child
        for pid in targets[1:]:  # reaped by their new parent once the wrapper is gone
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                pass
        if not alive:
            proc.wait()
            proc.stdout.close()
            return
        time.sleep(0.01)
    raise CoreInferError(f"the sandboxed program's processes ({targets}) survived SIGKILL for {grace_s:g} s")
