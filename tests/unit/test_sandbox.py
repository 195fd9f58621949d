"""The code sandbox against hostile programs: each attack from issue 5 is its own test.

Every attack must be contained (the caller gets a result and keeps going), and nothing outside
the sandbox's temporary directory may change. Timeouts are short (1-2 s) to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from megatron_spo.errors import UserError
from megatron_spo.rollout.sandbox import SandboxConfig, namespaces_available, run_python

NS = SandboxConfig(isolation="namespaces")
needs_namespaces = pytest.mark.skipif(
    not namespaces_available(), reason="Linux namespaces (unshare) unavailable on this machine"
)


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                pids.append(int(entry))
    return pids


def _wait_until_gone(marker: str, grace_s: float = 2.0) -> list[int]:
    deadline = time.monotonic() + grace_s
    while (alive := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _tree_snapshot(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# normal code


@needs_namespaces
def test_prints_and_returns_exit_code():
    result = run_python("import sys\nprint('hello', 6 * 7)\nsys.exit(3)", timeout_s=10, config=NS)
    assert result.stdout == "hello 42\n"
    assert result.exit_code == 3
    assert not result.timed_out
    assert result.isolation == "namespaces"


@needs_namespaces
def test_numpy_and_sympy_work():
    code = "import numpy as np, sympy as sp\nprint(int(np.arange(10).sum()))\nprint(sp.factor('x**2 - 1'))"
    result = run_python(code, timeout_s=20, config=NS)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["45", "(x - 1)*(x + 1)"]


@needs_namespaces
def test_stdin_is_fed():
    result = run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3\n4",
                        timeout_s=10, config=NS)
    assert result.stdout == "10\n"


def test_code_is_run_as_written_without_print_rewrite():
    # the upstream recipe turned the last line into print(...), breaking `x = 1` and hiding bugs
    result = run_python("x = 1\ny = x + 1", timeout_s=10)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SPO_TEST_SECRET_TOKEN", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('SPO_TEST_SECRET_TOKEN'))",
                        timeout_s=10)
    assert "hunter2" not in result.stdout
    assert "SPO_TEST_SECRET_TOKEN" not in result.stdout
    assert result.stdout.splitlines()[1] == "None"


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="sandbox.isolation"):
        SandboxConfig(isolation="docker")
    with pytest.raises(UserError, match="sandbox.max_processes"):
        SandboxConfig(max_processes=0)


# ---------------------------------------------------------------------------------------------
# attacks


@needs_namespaces
def test_infinite_loop_is_killed_at_the_deadline():
    started = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1, config=NS)
    assert result.timed_out
    assert result.exit_code is None
    assert time.monotonic() - started < 5  # killed, not waited out


@needs_namespaces
def test_fork_bomb_is_contained():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    code = (
        "import os, time\n"
        f"# {marker}\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    config = SandboxConfig(isolation="namespaces", max_processes=16)
    started = time.monotonic()
    result = run_python(code, timeout_s=1.5, config=config)
    assert result.timed_out
    assert time.monotonic() - started < 6
    # no sandbox process survives (they all run as the sandbox uid)
    deadline = time.monotonic() + 2
    while _uid_processes(config.uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _uid_processes(config.uid) == []
    # and the machine still forks: the caller keeps going
    assert run_python("print('alive')", timeout_s=10, config=NS).stdout == "alive\n"


def _uid_processes(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


@needs_namespaces
def test_memory_bomb_hits_the_address_space_limit():
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))"
    result = run_python(code, timeout_s=10, memory_mb=256, config=NS)
    assert not result.timed_out
    assert result.exit_code == 1
    assert "MemoryError" in result.stderr


@needs_namespaces
def test_one_gigabyte_print_is_capped():
    code = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    config = SandboxConfig(isolation="namespaces", max_output_bytes=100_000)
    started = time.monotonic()
    result = run_python(code, timeout_s=10, config=config)
    assert result.output_truncated
    assert len(result.stdout) == 100_000
    assert set(result.stdout) == {"x"}
    assert time.monotonic() - started < 8  # killed at the cap, not after 1 GB went through


@needs_namespaces
def test_writing_outside_the_working_directory_changes_nothing(tmp_path):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("original")
    os.chmod(tmp_path, 0o777)
    os.chmod(victim_dir, 0o777)
    before = _tree_snapshot(tmp_path)
    marker = f"escape-{uuid.uuid4().hex}"
    code = (
        "import os\n"
        f"targets = [{str(victim_dir / 'keep.txt')!r}, {str(victim_dir / marker)!r}, '/{marker}',\n"
        f"           '/usr/{marker}', {os.path.join(os.getcwd(), marker)!r}]\n"
        "for t in targets:\n"
        "    try:\n"
        "        with open(t, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        print('WROTE', t)\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', t, type(e).__name__)\n"
        f"open('/tmp/{marker}', 'w').write('sandbox-private tmp')\n"
        "open('inside.txt', 'w').write('ok')\n"
        "print('inside ok')\n"
    )
    result = run_python(code, timeout_s=10, config=NS)
    assert result.exit_code == 0, result.stderr
    assert "WROTE" not in result.stdout
    assert result.stdout.count("BLOCKED") == 5
    assert "inside ok" in result.stdout
    assert _tree_snapshot(tmp_path) == before
    for host_path in (f"/{marker}", f"/usr/{marker}", f"/tmp/{marker}", os.path.join(os.getcwd(), marker)):
        assert not os.path.exists(host_path)


@needs_namespaces
def test_reading_a_planted_file_fails(tmp_path):
    secret = tmp_path / "planted_secret.txt"
    secret.write_text("TOP-SECRET-7f3a")
    os.chmod(secret, 0o644)  # world-readable: only the namespace hides it
    os.chmod(tmp_path, 0o755)
    code = (
        f"for path in [{str(secret)!r}, '/proc/1/root{secret}', '/proc/1/cwd/spec.json', '/etc/shadow',\n"
        "             '/root/.bash_history', '/proc/1/environ']:\n"
        "    try:\n"
        "        print('READ', path, open(path).read())\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', path, type(e).__name__)\n"
    )
    result = run_python(code, timeout_s=10, config=NS)
    assert result.exit_code == 0, result.stderr
    assert "TOP-SECRET-7f3a" not in result.stdout
    assert "READ" not in result.stdout
    assert result.stdout.count("BLOCKED") == 6


@needs_namespaces
def test_socket_to_a_loopback_server_fails():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connections = []

    def accept():
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                connections.append(server.accept())
            except socket.timeout:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    code = (
        "import socket\n"
        "for host in ['127.0.0.1', 'localhost', '8.8.8.8']:\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=1).sendall(b'exfiltrated')\n"
        "        print('CONNECTED', host)\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', host, type(e).__name__)\n"
    )
    try:
        result = run_python(code, timeout_s=10, config=NS)
    finally:
        server.close()
        thread.join(timeout=10)
    assert "CONNECTED" not in result.stdout
    assert result.stdout.count("BLOCKED") == 3, result.stdout + result.stderr
    assert connections == []


@needs_namespaces
def test_killing_the_parent_process_fails():
    caller = os.getpid()
    code = (
        "import os, signal\n"
        f"for pid in [os.getppid(), 1, {caller}, -1]:\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        print('SENT', pid)\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', pid, type(e).__name__)\n"
    )
    result = run_python(code, timeout_s=10, config=NS)
    # kill(-1) reaches only the sandbox's own processes (itself included), so the code dies there
    # the code's parent is the namespace init (PID 1, root): not signalable by the sandbox uid;
    # the caller does not exist inside the PID namespace
    assert result.stdout.splitlines()[:3] == [
        "BLOCKED 1 PermissionError", "BLOCKED 1 PermissionError", f"BLOCKED {caller} ProcessLookupError"]
    os.kill(caller, 0)  # still alive (trivially: this line runs)
    assert run_python("print('next')", timeout_s=10, config=NS).stdout == "next\n"


@needs_namespaces
def test_setsid_and_double_fork_escapes_are_killed():
    marker = f"escapee-{uuid.uuid4().hex}"
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        import signal\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
        "print('escaped child started')\n"
        "sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    result = run_python(code, timeout_s=1.5, config=NS)
    assert result.timed_out
    assert "escaped child started" in result.stdout
    assert _wait_until_gone(marker) == []


@needs_namespaces
def test_escapee_dies_when_main_process_exits_normally():
    marker = f"daemon-{uuid.uuid4().hex}"
    code = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    os.closerange(0, 3)\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
        "print('main done')\n"
    )
    result = run_python(code, timeout_s=10, config=NS)
    assert result.stdout == "main done\n"
    assert not result.timed_out
    assert _wait_until_gone(marker) == []


@needs_namespaces
def test_ctypes_crash_is_contained():
    result = run_python("import ctypes\nctypes.string_at(0)", timeout_s=10, config=NS)
    assert result.exit_code == -11  # SIGSEGV, reported like subprocess does
    assert not result.timed_out
    assert run_python("print('after crash')", timeout_s=10, config=NS).stdout == "after crash\n"


def test_fallback_mode_applies_limits_and_deadline():
    config = SandboxConfig(isolation="none")
    ok = run_python("print(sum(range(10)))", timeout_s=10, config=config)
    assert (ok.stdout, ok.exit_code, ok.isolation) == ("45\n", 0, "none")
    loop = run_python("while True:\n    pass", timeout_s=1, config=config)
    assert loop.timed_out
    memory = run_python("x = bytearray(2 * 1024 ** 3)", timeout_s=10, memory_mb=256, config=config)
    assert "MemoryError" in memory.stderr


# ---------------------------------------------------------------------------------------------
# SandboxFusion client, against a local HTTP server speaking its /run_code protocol


class _FusionHandler(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FusionHandler.requests.append({"path": self.path, **body})
        if "while True" in body["code"]:
            reply = {"status": "Failed", "message": "",
                     "run_result": {"status": "TimeLimitExceeded", "return_code": None, "stdout": "",
                                    "stderr": ""}}
        else:
            reply = {"status": "Success", "message": "",
                     "run_result": {"status": "Finished", "return_code": 0,
                                    "stdout": f"ran {len(body['code'])} chars, stdin={body['stdin']!r}\n",
                                    "stderr": "", "execution_time": 0.01}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_sandbox_fusion_backend_speaks_run_code():
    server = HTTPServer(("127.0.0.1", 0), _FusionHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = SandboxConfig(backend="sandbox_fusion", fusion_url=f"http://127.0.0.1:{server.server_port}/")
    try:
        ok = run_python("print(1)", timeout_s=3, memory_mb=128, stdin="abc", config=config)
        slow = run_python("while True: pass", timeout_s=2, config=config)
    finally:
        server.shutdown()
    assert (ok.stdout, ok.exit_code, ok.timed_out, ok.isolation) == ("ran 8 chars, stdin='abc'\n", 0, False,
                                                                    "sandbox_fusion")
    assert slow.timed_out
    first = _FusionHandler.requests[0]
    assert first == {"path": "/run_code", "code": "print(1)", "language": "python", "run_timeout": 3,
                     "memory_limit_MB": 128, "stdin": "abc"}


def test_sandbox_fusion_unreachable_is_a_result_not_a_crash():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = SandboxConfig(backend="sandbox_fusion", fusion_url=f"http://127.0.0.1:{port}",
                           fusion_request_slack_s=1)
    result = run_python("print(1)", timeout_s=1, config=config)
    assert result.exit_code is None
    assert "sandbox_fusion request" in result.stderr


# ---------------------------------------------------------------------------------------------
# an unprivileged caller: root of a user namespace with no capabilities instead of a uid drop

_UNPRIVILEGED_PROBE = r"""
import json, os, sys
from megatron_spo.rollout.sandbox import SandboxConfig, run_python
secret = sys.argv[1]
code = (
    "import os\n"
    "caps = open('/proc/self/status').read().split('CapBnd:')[1].split()[0]\n"
    "try:\n"
    "    os.chroot('/tmp'); chroot = 'allowed'\n"
    "except OSError:\n"
    "    chroot = 'blocked'\n"
    "reads = []\n"
    f"for path in [{secret!r}, '/proc/1/root' + {secret!r}]:\n"
    "    try:\n"
    "        open(path).read(); reads.append('allowed')\n"
    "    except OSError:\n"
    "        reads.append('blocked')\n"
    "print(caps, chroot, *reads)\n"
)
result = run_python(code, timeout_s=20, config=SandboxConfig(isolation="namespaces"))
print(json.dumps({"caller_uid": os.geteuid(), "isolation": result.isolation, "stdout": result.stdout,
                  "stderr": result.stderr}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to become an unprivileged user), setpriv and a system python3")
def test_unprivileged_caller_gets_a_capability_free_user_namespace():
    repo = Path(__file__).resolve().parents[2]
    if any(not (os.stat(p).st_mode & 0o005) for p in (repo, repo / "megatron_spo")):
        pytest.skip("the checkout is not readable by other users")
    planted = Path(tempfile.mkdtemp(prefix="spo-planted-"))
    try:
        os.chmod(planted, 0o755)
        (planted / "secret.txt").write_text("PLANTED")
        os.chmod(planted / "secret.txt", 0o644)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
             _UNPRIVILEGED_PROBE, str(planted / "secret.txt")],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=120,
            cwd="/",
        )
    finally:
        shutil.rmtree(planted)
    if proc.returncode != 0:
        pytest.skip(f"system python3 cannot run the sandbox module: {proc.stderr[-300:]}")
    report = json.loads(proc.stdout.splitlines()[-1])
    if report["isolation"] != "namespaces":
        pytest.skip("unprivileged user namespaces are disabled on this machine")
    assert report["caller_uid"] == 65534
    assert report["stdout"].split() == ["0000000000000000", "blocked", "blocked", "blocked"], report
