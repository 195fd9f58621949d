"""Run untrusted Python (written by the policy being trained) and return what it printed.

The code comes from a model that is optimised to get reward, so it is treated as hostile. One
call, `run_python(code, timeout_s=5, memory_mb=512, stdin="")`, starts a fresh interpreter on
the code *as written* (no rewriting of the last line into a `print`, unlike the upstream recipe)
and returns a `SandboxResult` with `stdout`, `stderr`, `exit_code`, `timed_out`.

Isolation modes (`SandboxConfig.isolation`; "auto" picks the strongest one that works here):

``namespaces`` (Linux, needs `unshare` from util-linux and either root or unprivileged user
namespaces). The code runs inside new PID, network, mount, IPC and UTS namespaces:
  - filesystem: the root is a fresh size-limited tmpfs holding only read-only bind mounts of
    what the interpreter needs (`/usr`, `/lib*`, `/bin`, `/sbin`, `/etc/ld.so.cache`, the
    Python prefix and the virtualenv, plus `SandboxConfig.extra_readonly_paths`), `/dev/{null,
    zero,full,random,urandom}`, a private `/proc`, a writable `/tmp` and the working directory
    `/sandbox`. Nothing else of the host exists inside: the user's files, /root, /home, other
    temp dirs cannot be read or written, and everything written dies with the tmpfs;
  - network: a new network namespace with only a loopback device that is down, so no socket
    reaches any host or the host's loopback;
  - processes: the code is a child of a tiny init (this module, PID 1 of the namespace). When
    the code's main process exits, or the caller kills the init at the deadline, the kernel
    kills every process in the namespace, including ones that escaped with `setsid`,
    double-forked, or ignore signals. Processes outside the namespace are invisible, so
    `os.kill` cannot reach the caller;
  - privileges: when started as root the code runs as `SandboxConfig.uid` / `gid` (default
    65534, "nobody") with no supplementary groups; when started unprivileged it runs as root of
    a user namespace with an empty capability bounding set. `no_new_privs` is set and bind
    mounts are `nosuid`, so no setuid binary can raise privileges.
``none`` (fallback when namespaces are unavailable, e.g. inside a container that forbids
`unshare`). Only the resource limits, a fresh temp working directory, the scrubbed environment
and a new session whose process group is killed at the deadline apply. NOT isolated in this
mode: the filesystem (the code can read whatever the calling user can, and write outside its
working directory), the network, and processes that leave the process group with `setsid`
(they can outlive the deadline). "auto" logs a warning when it falls back to it.

In every mode: rlimits on CPU time (`ceil(timeout_s) + 1` s), address space (`memory_mb`),
processes (`max_processes`, counted per uid), open files, file size and core dumps; a wall-time
deadline; an environment holding only PATH/HOME/TMPDIR/LANG and single-thread BLAS settings;
stdout and stderr each capped at `max_output_bytes` (the run is killed once the cap is passed).

Not isolated in any mode: CPU and memory bandwidth (a sandbox can slow its neighbours within
its limits), the kernel itself (syscalls are not filtered with seccomp), and the process count
is per uid, so concurrent sandboxes share `max_processes`.

``SandboxConfig.backend = "sandbox_fusion"`` sends the code to an existing SandboxFusion service
(`POST {url}/run_code`) instead, for users who already run one.

This module imports only the standard library at top level: it re-executes itself as the
namespace init (`python -I -S sandbox.py --namespace-init SPEC`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Literal

logger = logging.getLogger(__name__)

Isolation = Literal["auto", "namespaces", "none"]


@dataclasses.dataclass(kw_only=True)
class SandboxConfig:
    backend: Literal["local", "sandbox_fusion"] = "local"
    """Where code runs: "local" (this machine, `isolation` below) or an external SandboxFusion."""
    timeout_s: float = 5.0
    """Wall-clock limit per execution (s). ReTool-style tool calls are short computations; 5 s
    matches the upstream recipe's sandbox timeout."""
    memory_mb: int = 512
    """Address-space limit (MiB). Enough for numpy/sympy imports and small arrays."""
    isolation: Isolation = "auto"
    """"namespaces", "none" (rlimits and process group only), or "auto" (namespaces if they work)."""
    max_output_bytes: int = 64 * 1024
    """Cap on each of stdout and stderr (bytes); the run is killed once the cap is passed. The
    agent loop truncates further to `max_tool_response_length` tokens."""
    max_processes: int = 32
    """RLIMIT_NPROC: processes/threads of the sandbox uid at once; stops fork bombs."""
    max_open_files: int = 64
    """RLIMIT_NOFILE: file descriptors per process."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: largest file the code may write (MiB)."""
    disk_mb: int = 64
    """Size of the tmpfs holding /sandbox and /tmp in namespace mode (MiB; counts against RAM)."""
    uid: int = 65534
    """User the code runs as when the caller is root ("nobody" by default)."""
    gid: int = 65534
    """Group the code runs as when the caller is root ("nogroup" by default)."""
    extra_readonly_paths: list[str] = dataclasses.field(default_factory=list)
    """Host paths made visible read-only inside the namespace (e.g. a data directory)."""
    python: str = ""
    """Interpreter for the code; empty means the one running this process (same packages)."""
    fusion_url: str = "http://localhost:8080"
    """Base URL of the SandboxFusion service when backend is "sandbox_fusion"."""
    fusion_request_slack_s: float = 10.0
    """Extra seconds the HTTP request may take beyond `timeout_s` (queueing, start-up)."""

    def __post_init__(self):
        from megatron_spo.errors import UserError

        if self.backend not in ("local", "sandbox_fusion"):
            raise UserError(f"sandbox.backend must be 'local' or 'sandbox_fusion', got {self.backend!r}")
        if self.isolation not in ("auto", "namespaces", "none"):
            raise UserError(f"sandbox.isolation must be auto|namespaces|none, got {self.isolation!r}")
        for name in ("timeout_s", "memory_mb", "max_output_bytes", "max_processes", "max_open_files",
                     "max_file_mb", "disk_mb"):
            if getattr(self, name) <= 0:
                raise UserError(f"sandbox.{name} must be > 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(kw_only=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    """Exit status; negative -N when killed by signal N (-9 when killed at the output cap); None
    when killed at the deadline."""
    timed_out: bool
    """The wall-clock deadline passed and the whole sandbox was killed."""
    output_truncated: bool = False
    """stdout or stderr passed `max_output_bytes`; the run was killed at that point."""
    isolation: str = "none"
    """How the code actually ran: "namespaces", "none" or "sandbox_fusion"."""
    wall_time_s: float = 0.0


def run_python(
    code: str,
    *,
    timeout_s: float = 5,
    memory_mb: int = 512,
    stdin: str = "",
    config: SandboxConfig | None = None,
) -> SandboxResult:
    """Run `code` in a fresh sandboxed interpreter; never raises for anything the code does.

    `timeout_s` and `memory_mb` override the config's values (the config supplies the rest).
    """
    config = dataclasses.replace(config or SandboxConfig(), timeout_s=timeout_s, memory_mb=memory_mb)
    if config.backend == "sandbox_fusion":
        return _run_sandbox_fusion(code, stdin, config)
    isolation = config.isolation
    if isolation == "auto":
        isolation = "namespaces" if namespaces_available(config) else "none"
    return _run_local(code, stdin, config, isolation)


# ---------------------------------------------------------------------------------------------
# caller side


_PROBE_CACHE: dict[tuple, bool] = {}


def namespaces_available(config: SandboxConfig | None = None) -> bool:
    """Whether namespace isolation works on this machine (probed once per interpreter/uid)."""
    config = config or SandboxConfig()
    key = (config.python or sys.executable, os.geteuid())
    if key not in _PROBE_CACHE:
        ok = False
        if shutil.which("unshare") and sys.platform.startswith("linux"):
            probe = dataclasses.replace(config, timeout_s=20.0, memory_mb=max(config.memory_mb, 256))
            result = _run_local("print(6 * 7)", "", probe, "namespaces")
            ok = result.exit_code == 0 and result.stdout.strip() == "42"
            if not ok:
                logger.warning(
                    "sandbox: namespace isolation unavailable (exit %s: %s); falling back to "
                    "rlimits + process group only, which does NOT isolate the filesystem, the "
                    "network, or setsid escapes", result.exit_code, result.stderr.strip()[-300:])
        _PROBE_CACHE[key] = ok
    return _PROBE_CACHE[key]


def _sandbox_env(home: str, tmpdir: str) -> dict[str, str]:
    # Scrubbed: nothing of the caller's environment (tokens, paths, proxies) leaks in.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": tmpdir,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        # BLAS/OpenMP thread pools would count against max_processes and the shared cores
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }


def _limits(config: SandboxConfig) -> dict[str, int]:
    mib = 1024 * 1024
    return {
        "RLIMIT_CPU": math.ceil(config.timeout_s) + 1,  # s; wall deadline normally fires first
        "RLIMIT_AS": config.memory_mb * mib,
        "RLIMIT_NPROC": config.max_processes,
        "RLIMIT_NOFILE": config.max_open_files,
        "RLIMIT_FSIZE": config.max_file_mb * mib,
        "RLIMIT_CORE": 0,
    }


def _readonly_paths(python: str, config: SandboxConfig) -> list[str]:
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin",
             "/etc/ld.so.cache", "/etc/localtime"]
    if python == sys.executable:
        prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    else:
        prefixes = [os.path.dirname(os.path.dirname(os.path.abspath(python)))]
    prefixes.append(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    paths += [os.path.realpath(p) for p in prefixes] + [os.path.abspath(p) for p in prefixes]
    paths += list(config.extra_readonly_paths)
    unique: list[str] = []
    for path in paths:
        if path not in unique and os.path.lexists(path):
            unique.append(path)
    return unique


def _run_local(code: str, stdin: str, config: SandboxConfig, isolation: str) -> SandboxResult:
    python = config.python or sys.executable
    host_dir = tempfile.mkdtemp(prefix="spo-sandbox-")  # 0700, owned by the caller
    try:
        if isolation == "namespaces":
            spec = {
                "code": code,
                "root": os.path.join(host_dir, "root"),
                "status_path": os.path.join(host_dir, "status.json"),
                "python": python,
                "readonly_paths": _readonly_paths(python, config),
                "disk_mb": config.disk_mb,
                "uid": config.uid,
                "gid": config.gid,
                "limits": _limits(config),
                "env": _sandbox_env("/sandbox", "/tmp"),
            }
            os.mkdir(spec["root"], 0o700)
            spec_path = os.path.join(host_dir, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            cmd = [shutil.which("unshare") or "unshare", "--pid", "--net", "--mount", "--ipc", "--uts",
                   "--fork", "--kill-child"]
            if os.geteuid() != 0:
                cmd += ["--user", "--map-root-user"]
            cmd += ["--", sys.executable, "-I", "-S", os.path.abspath(__file__), "--namespace-init", spec_path]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            cwd = host_dir
        else:
            work = os.path.join(host_dir, "work")
            os.mkdir(work, 0o700)
            with open(os.path.join(work, "main.py"), "w") as f:
                f.write(code)
            cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--limits-exec",
                   json.dumps(_limits(config)), python, "-I", "-B", "main.py"]
            env = _sandbox_env(work, work)
            cwd = work
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True, close_fds=True)
        stdout, stderr, timed_out, truncated = _collect(proc, stdin.encode(), started + config.timeout_s,
                                                        config.max_output_bytes)
        exit_code = proc.returncode
        if isolation == "namespaces":
            exit_code = _read_status(os.path.join(host_dir, "status.json"), exit_code)
        if timed_out:
            exit_code = None
        return SandboxResult(
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            exit_code=exit_code,
            timed_out=timed_out,
            output_truncated=truncated,
            isolation=isolation,
            wall_time_s=time.monotonic() - started,
        )
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def _read_status(path: str, launcher_code: int | None) -> int | None:
    # The init writes the code's real wait status; without it (killed, or set-up failed) the
    # launcher's own exit code is the best we have.
    try:
        with open(path) as f:
            return int(json.load(f)["exit_code"])
    except (OSError, ValueError, KeyError):
        return launcher_code


def _collect(proc: subprocess.Popen, stdin_bytes: bytes, deadline: float, cap: int):
    """Feed stdin and read stdout/stderr until EOF, the deadline, or `cap` bytes on a stream.

    Returns (stdout, stderr, timed_out, truncated). The sandbox's process group is always killed
    before returning (in namespace mode that kills the namespace's init, hence all of it).
    """
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    timed_out = truncated = False
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        stdin_fd = proc.stdin.fileno()
        if stdin_bytes:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        pending = memoryview(stdin_bytes)
        while selector.get_map() and not truncated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the code exited without reading all of stdin
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(fd)
                    continue
                buffers[fd] += chunk
                if len(buffers[fd]) > cap:
                    truncated = True
    if not timed_out and not truncated:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True  # closed its pipes but kept running
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if not stream.closed:
            stream.close()
    out, err = (bytes(b[:cap]) for b in buffers.values())
    return out, err, timed_out, truncated


def _run_sandbox_fusion(code: str, stdin: str, config: SandboxConfig) -> SandboxResult:
    """Client for SandboxFusion's `POST /run_code` (request: code, language, run_timeout,
    memory_limit_MB, stdin; response: status, message, run_result{status, return_code, stdout,
    stderr, execution_time})."""
    import urllib.error
    import urllib.request

    body = json.dumps({
        "code": code,
        "language": "python",
        "run_timeout": config.timeout_s,
        "memory_limit_MB": config.memory_mb,
        "stdin": stdin,
    }).encode()
    request = urllib.request.Request(config.fusion_url.rstrip("/") + "/run_code", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s + config.fusion_request_slack_s) as resp:
            payload = json.loads(resp.read())
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        return SandboxResult(stdout="", stderr=f"sandbox_fusion request to {config.fusion_url} failed: {e}",
                             exit_code=None, timed_out=False, isolation="sandbox_fusion",
                             wall_time_s=time.monotonic() - started)
    run = payload.get("run_result") or {}
    stdout, stderr = run.get("stdout") or "", run.get("stderr") or ""
    if payload.get("status") == "SandboxError" and not stderr:
        stderr = f"SandboxError: {payload.get('message', '')}"
    cap = config.max_output_bytes
    truncated = len(stdout.encode()) > cap or len(stderr.encode()) > cap
    return SandboxResult(
        stdout=stdout.encode()[:cap].decode("utf-8", errors="ignore"),
        stderr=stderr.encode()[:cap].decode("utf-8", errors="ignore"),
        exit_code=run.get("return_code"),
        timed_out=run.get("status") == "TimeLimitExceeded",
        output_truncated=truncated,
        isolation="sandbox_fusion",
        wall_time_s=time.monotonic() - started,
    )


# ---------------------------------------------------------------------------------------------
# sandbox side: runs as `python -I -S sandbox.py ...`, standard library only

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 16384, 1 << 18, 1 << 21
_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 4, 24, 38


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source, target, fstype, flags, data=None):
    import ctypes

    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} -> {target}: {os.strerror(errno)}")


def _bind_readonly(libc, host_path: str, root: str):
    target = root + host_path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.islink(host_path):  # e.g. /bin -> usr/bin on merged-/usr systems
        if not os.path.lexists(target):
            os.symlink(os.readlink(host_path), target)
        return
    if os.path.isdir(host_path):
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.exists(target):
        open(target, "w").close()
    _mount(libc, host_path, target, None, _MS_BIND | _MS_REC)
    # Keep flags the kernel locks in user namespaces (nodev/noexec/atime), add ro + nosuid + nodev.
    st = os.statvfs(host_path).f_flag
    keep = ((_MS_NOEXEC if st & os.ST_NOEXEC else 0) | (_MS_NOATIME if st & os.ST_NOATIME else 0)
            | (_MS_NODIRATIME if st & os.ST_NODIRATIME else 0) | (_MS_RELATIME if st & os.ST_RELATIME else 0))
    _mount(libc, None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | keep)


def _set_limits(limits: dict[str, int]):
    import resource

    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _drop_privileges(libc, uid: int, gid: int):
    if os.geteuid() == 0 and _is_initial_user_namespace():
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    else:
        # root of our own user namespace: stay uid 0 there but give up every capability, so
        # the next execve grants none
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        for cap in range(last_cap + 1):
            libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")


def _is_initial_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _namespace_init(spec_path: str) -> int:
    """PID 1 of the sandbox's namespaces: build the root, start the code, reap, report."""
    with open(spec_path) as f:
        spec = json.load(f)
    libc = _libc()
    root = spec["root"]
    in_user_ns = not _is_initial_user_namespace()
    # util-linux unshare already made mounts private; repeat it so nothing propagates to the host
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={spec['disk_mb']}m,mode=755")
    for path in spec["readonly_paths"]:
        _bind_readonly(libc, path, root)
    os.makedirs(root + "/dev", mode=0o755, exist_ok=True)
    for dev in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + dev):
            open(f"{root}/dev/{dev}", "w").close()
            _mount(libc, "/dev/" + dev, f"{root}/dev/{dev}", None, _MS_BIND)
    for shared_tmp in ("/tmp", "/dev/shm"):
        os.makedirs(root + shared_tmp, exist_ok=True)
        os.chmod(root + shared_tmp, 0o1777)
    os.makedirs(root + "/proc", mode=0o555, exist_ok=True)
    try:
        _mount(libc, "proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:
        pass  # some containers refuse a fresh proc in a user namespace; Python runs without it
    work = root + "/sandbox"
    os.mkdir(work, 0o700)
    with open(work + "/main.py", "w") as f:
        f.write(spec["code"])
    if not in_user_ns:
        for path in (work, work + "/main.py"):
            os.chown(path, spec["uid"], spec["gid"])

    pid = os.fork()
    if pid == 0:
        try:
            os.chroot(root)
            os.chdir("/sandbox")
            _drop_privileges(libc, spec["uid"], spec["gid"])
            _set_limits(spec["limits"])
            python = spec["python"]
            os.execve(python, [python, "-I", "-B", "main.py"], spec["env"])
        except BaseException as e:  # noqa: BLE001 - report any set-up failure, never run the code
            os.write(2, f"sandbox set-up failed: {e!r}\n".encode())
        os._exit(126)
    # Not dumpable: the code cannot reach the host filesystem through /proc/1/root or /proc/1/cwd
    # of this (unchrooted) init, even where it shares the init's uid (user-namespace mode).
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    # As init, reap every orphan until the code's main process ends; returning then ends the
    # namespace, and the kernel kills whatever the code left behind.
    exit_code = 126
    while True:
        try:
            waited, status = os.wait()
        except ChildProcessError:
            break
        if waited == pid:
            exit_code = os.waitstatus_to_exitcode(status)
            break
    with open(spec["status_path"], "w") as f:
        json.dump({"exit_code": exit_code}, f)
    return 0


def _limits_exec(limits_json: str, argv: list[str]) -> int:
    """Fallback mode: set rlimits in this (already new-session) process and exec the code."""
    _set_limits(json.loads(limits_json))
    os.execve(argv[0], argv, dict(os.environ))
    return 126  # not reached


if __name__ == "__main__":
    if sys.argv[1] == "--namespace-init":
        sys.exit(_namespace_init(sys.argv[2]))
    if sys.argv[1] == "--limits-exec":
        sys.exit(_limits_exec(sys.argv[2], sys.argv[3:]))
    sys.exit(f"usage: {sys.argv[0]} --namespace-init SPEC | --limits-exec LIMITS CMD...")
