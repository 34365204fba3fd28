"""Tests of dfm_hf.evaluation.sandbox: every attack is stopped, and the host and later programs carry on."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap

import pytest

from dfm_hf.evaluation.sandbox import STATUSES, SandboxResult, run_program, run_programs
from dfm_hf.evaluation.sandbox_child import _make_hook

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

GOOD = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n"


def assert_still_works() -> None:
    """The host is alive and a fresh, honest program still passes."""
    result = run_program(GOOD, timeout=5)
    assert result.passed, result.stderr
    assert result.status == "passed" and result.stdout == "ok\n"


def run(code: str, **kwargs) -> SandboxResult:
    result = run_program(textwrap.dedent(code), **{"timeout": 5, **kwargs})
    assert result.status in STATUSES
    return result


def test_passing_and_failing_programs():
    ok = run(GOOD)
    assert ok.passed and ok.returncode == 0 and ok.message == "passed"
    bad = run("assert 1 + 1 == 3, 'arithmetic'")
    assert not bad.passed and bad.status == "failed"
    assert "AssertionError: arithmetic" in bad.stderr and bad.message == "failed: AssertionError: arithmetic"
    syntax = run("def f(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_exit_does_not_fake_success():
    assert run("import sys\nsys.exit(0)").status == "failed"
    result = run("import os\nos._exit(0)")
    assert result.status == "failed" and "_exit" in result.stderr


def test_infinite_loop_times_out():
    result = run("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed and result.message == "timed out"
    # killed by the wall-clock timeout (SIGKILL to the group) or, on a starved host, by the CPU limit (SIGXCPU)
    assert result.returncode in (-signal.SIGKILL, -signal.SIGXCPU), result.returncode
    sleeper = run("import time\ntime.sleep(60)\nprint('woke up')", timeout=0.5)
    # a sleeping program uses no CPU time: only the wall-clock timeout's SIGKILL can have ended it
    assert sleeper.status == "timeout" and sleeper.returncode == -signal.SIGKILL and sleeper.stdout == ""
    assert_still_works()


def test_fork_loop_is_stopped():
    result = run(
        """
        import os
        while True:
            os.fork()
        """,
        timeout=2,
    )
    assert result.status == "failed" and "os.fork" in result.stderr
    for code in (
        "import subprocess\nsubprocess.run(['true'])",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.kill(os.getppid(), 9)",
        "import pty\npty.fork()",
    ):
        assert not run(code).passed, code
    assert_still_works()


def test_os_system_cannot_touch_files(tmp_path):
    marker = tmp_path / "marker"
    result = run(f"import os\nos.system('touch {marker}')")
    assert not result.passed and "os.system" in result.stderr
    assert not marker.exists()


def test_huge_allocation_is_stopped():
    result = run("x = bytearray(8 * 1024 ** 3)\n", memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.stderr
    result = run("x = [0] * (10 ** 9)\n", memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.stderr
    assert_still_works()


def test_network_is_refused():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        result = run(
            f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.connect(("127.0.0.1", {port}))
            s.sendall(b"leak")
            """
        )
        assert result.status == "failed" and "socket" in result.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected
    finally:
        server.close()
    # "localhost" resolves without any network, so only the sandbox can make this fail.
    dns = run("import socket\nsocket.getaddrinfo('localhost', 80)")
    assert dns.status == "failed" and "socket.getaddrinfo" in dns.stderr
    assert not run("import socket\nsocket.gethostbyname('localhost')").passed
    assert not run("import socket\nsocket.socketpair()").passed
    assert_still_works()


def test_write_outside_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run(f"open({str(target)!r}, 'w').write('escaped')")
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert not target.exists()
    # Indirect routes: os.open, a directory descriptor, /proc/self/cwd/.., a symbolic link, rename.
    for code in (
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
        "open('/proc/self/cwd/../escaped.txt', 'w')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w')",
        f"open('x', 'w').close()\nimport os\nos.rename('x', {str(target)!r})",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('escaped')",
    ):
        assert not run(code).passed, code
        assert not target.exists(), code
    assert_still_works()


def test_delete_outside_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    for code in (
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import os\nos.rmdir({str(folder)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.chmod({str(victim)!r}, 0)",
        f"import os\nos.truncate({str(victim)!r}, 0)",
        f"import os\nos.mkdir({str(tmp_path / 'new')!r})",
    ):
        result = run(code)
        assert result.status == "failed" and "sandbox:" in result.stderr, code
    assert victim.read_text() == "keep me"
    assert folder.is_dir() and not (tmp_path / "new").exists()
    assert oct(victim.stat().st_mode & 0o777) != "0o0"
    assert_still_works()


def test_work_directory_is_private_usable_and_removed():
    result = run(
        """
        import os, pathlib, shutil, tempfile
        print(os.getcwd())
        assert os.listdir('.') == []
        pathlib.Path('a.txt').write_text('x')
        os.makedirs('d/e')
        os.rename('a.txt', 'd/e/b.txt')
        shutil.rmtree('d')
        with tempfile.TemporaryDirectory() as tmp:
            open(os.path.join(tmp, 'f'), 'w').close()
            assert tmp.startswith(os.getcwd())
        """
    )
    assert result.passed, result.stderr
    workdir = result.stdout.strip()
    assert workdir and not os.path.exists(workdir)


def test_reads_and_introspection_are_limited():
    assert run("import json, re, collections, heapq, math, itertools, functools, typing, dataclasses").passed
    assert not run("open('/etc/passwd').read()").passed
    assert run("open('/etc/passwd').read()", restrict_reads=False).passed
    assert not run("import ctypes").passed
    assert not run("import gc\ngc.get_objects()").passed
    assert not run("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (-1, -1))").passed
    assert not run("def f(): pass\nf.__code__ = (lambda: 1).__code__").passed


def test_output_and_file_size_are_capped():
    result = run("import sys\nfor _ in range(10 ** 6):\n    sys.stdout.write('x' * 4096)", max_output_bytes=1000)
    assert not result.passed
    assert len(result.stdout) < 1100 and result.stdout.startswith("...[truncated]")
    assert not run("open('big', 'wb').write(b'0' * (3 * 1024 * 1024))", file_size_mb=1).passed


def test_main_guard_follows_as_main():
    code = "if __name__ == '__main__':\n    raise SystemExit('main ran')\n"
    assert not run(code).passed
    assert run(code, as_main=False).passed


@pytest.mark.slow
def test_run_programs_keeps_order_and_goes_on_after_attacks(tmp_path):
    target = tmp_path / "out.txt"
    codes = [
        GOOD,
        "while True: pass",
        "import os\nwhile True: os.fork()",
        "x = bytearray(8 * 1024 ** 3)",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        f"open({str(target)!r}, 'w')",
        "raise ValueError('no')",
        GOOD,
    ]
    # 5 s: the good programs (interpreter start-up included) finish well within it on a loaded 2-core machine
    results = run_programs(codes, n_workers=2, timeout=5.0, memory_mb=256)
    assert [r.status for r in results] == [
        "passed",
        "timeout",
        "failed",
        "failed",
        "failed",
        "failed",
        "failed",
        "passed",
    ]
    assert not target.exists()
    assert run_programs([]) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        run_program(GOOD, timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program(GOOD, memory_mb=1)
    with pytest.raises(ValueError, match="code"):
        run_program(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_workers"):
        run_programs([GOOD], n_workers=0)
    with pytest.raises(ValueError, match=r"codes\[1\]"):
        run_programs([GOOD, None])  # type: ignore[list-item]


# ------------------------------------------------------------------------------ the child's audit hook, in process


def hook_for(workdir, read_roots=None) -> tuple:
    """The child's audit hook for ``workdir``, called directly here (it is never installed in the test process)."""
    cfg = {
        "workdir": str(workdir),
        "read_roots": read_roots,
        "refused_events": ["os.fork"],
        "refused_prefixes": ["socket."],
        "refused_imports": ["ctypes"],
    }
    return _make_hook(cfg), cfg


def test_child_hook_refuses_writes_outside_and_follows_links(tmp_path):
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    hook, _ = hook_for(work)
    hook("open", (str(work / "a.txt"), "w", os.O_WRONLY))  # inside: allowed
    hook("open", ("/dev/null", "w", os.O_WRONLY))
    for path in (outside / "x", work / ".." / "outside" / "x", "/proc/self/cwd/../x"):
        with pytest.raises(PermissionError, match="outside the sandbox directory"):
            hook("open", (str(path), "w", os.O_WRONLY))
    (work / "link").symlink_to(outside)
    with pytest.raises(PermissionError, match="outside the sandbox directory"):
        hook("open", (str(work / "link" / "x"), None, os.O_WRONLY | os.O_CREAT))  # os.open through a link
    with pytest.raises(PermissionError, match="os.rename"):
        hook("os.rename", (str(work / "a.txt"), str(outside / "a.txt"), None, None))
    with pytest.raises(PermissionError, match="os.remove"):
        hook("os.remove", (str(outside / "x"), None))


def test_child_hook_refuses_events_imports_and_restricted_reads(tmp_path):
    hook, cfg = hook_for(tmp_path, read_roots=[str(tmp_path / "lib")])
    for event, args in (("os.fork", ()), ("socket.connect", (None, ("127.0.0.1", 9))), ("import", ("ctypes.util",))):
        with pytest.raises(PermissionError, match="refused"):
            hook(event, args)
    with pytest.raises(PermissionError, match="__code__"):
        hook("object.__setattr__", (lambda: 0, "__code__", None))
    hook("import", ("json",))
    hook("open", (str(tmp_path / "lib" / "m.py"), "r", 0))
    with pytest.raises(PermissionError, match="is not allowed"):
        hook("open", ("/etc/hostname", "r", 0))
    cfg["read_roots"].append("/etc")  # the hook copied its configuration when it was made
    with pytest.raises(PermissionError, match="is not allowed"):
        hook("open", ("/etc/hostname", "r", 0))
    with pytest.raises(PermissionError, match="directory"):
        hook("open", ("/usr", None, os.O_RDONLY))  # a directory descriptor outside would let dir_fd escape
