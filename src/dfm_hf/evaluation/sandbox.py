"""Run untrusted Python programs (e.g. model-generated code and its unit tests) in a restricted child process.

What it guarantees (Linux, CPython >= 3.10):

* **One fresh process per program.** Each program runs in its own interpreter, started as
  ``sys.executable -I -S -B -u sandbox_child.py CONFIG`` (the runner, :mod:`dfm_hf.evaluation.sandbox_child`, by path;
  isolated mode: no ``PYTHON*`` environment variables, no user site, neither the current directory nor the
  runner's folder on ``sys.path``; ``-S``: no ``site``, so only the standard library is importable and the builtins
  ``exit``/``quit``/``help`` do not exist). The environment is replaced by a minimal one (``PATH``, ``LC_ALL``,
  ``HOME`` and ``TMPDIR`` pointing at the work directory); stdin is ``/dev/null``.
* **A fresh, private working directory**, created empty for each program and deleted afterwards (also after a
  timeout or a crash). The program is not written inside it.
* **Resource limits** (``setrlimit``, set in the child before the program runs; hard limit = soft limit, except
  for CPU time): CPU seconds (``ceil(timeout) + 1``: ``SIGXCPU``, then ``SIGKILL`` one second later), address
  space (``memory_mb``), size of any written file (``file_size_mb``, stdout and stderr included), open files
  (128), no core dumps, and ``RLIMIT_NPROC = 0`` (no new processes *or threads*; the kernel does not enforce this
  limit for root, where only the audit hook below stops forks, and threads remain possible).
* **A wall-clock timeout**: the child leads its own session / process group, and the whole group is killed with
  ``SIGKILL`` when ``timeout`` expires (and, as a backstop, after every run, before the child is reaped so that
  the group id cannot have been reused).
* **An audit hook** (``sys.addaudithook``), installed in the child after the limits and before the program's first
  line, that refuses (raises ``PermissionError``): opening a file for writing (or creating/truncating it)
  anywhere but inside the work directory (``/dev/null`` excepted); creating, removing, renaming, chmod/chown/utime
  or truncating paths outside it; hard and symbolic links; opening a directory outside it with ``os.open`` (so
  ``dir_fd`` cannot smuggle a write out); reads outside the work directory, the standard library and a few
  harmless system files (``restrict_reads=True``, the default); every ``socket.*`` event (creation, connect,
  bind, DNS lookups: no network at all); ``os.fork``/``os.forkpty``/``os.exec*``/``os.spawn*``/``os.posix_spawn*``
  /``os.system``/``subprocess.Popen``/``pty.spawn``; ``os.kill``/``os.killpg``/``signal.pthread_kill``; ``ctypes``
  (importing it and every ``ctypes.*`` event) and ``_posixsubprocess`` (so ``import subprocess`` and
  ``multiprocessing`` fail); ``resource.setrlimit``/``prlimit``;
  ``sys.addaudithook``; creating code objects (``code.__new__``) and replacing a function's ``__code__``;
  ``gc.get_objects``/``get_referrers``/``get_referents``; importing the ``_test*`` C modules and re-importing
  ``posix``. Paths are resolved like the kernel does (symbolic links followed with ``lstat``/``readlink``
  captured at install time, ``dir_fd`` and file descriptors resolved through ``/proc/self/fd``).
  In addition, functions that raise no audit event but matter to a process running as root are deleted from
  ``os``/``posix`` before the program runs: ``_exit``, ``mknod``, ``chroot``, the ``set*id``/``setgroups`` family,
  ``setsid``/``setpgid``/``setpgrp``, ``setpriority``, ``sched_set*``, ``pidfd_open``, ``memfd_create``.
* **An honest verdict.** A program passes only if it runs to its end: an uncaught exception, ``SystemExit``
  (``sys.exit(0)`` included, as in the Hub's ``code_eval``), a signal, a limit or the timeout all count as a
  failure, and ``os._exit`` is not available to fake success.
* The host process never runs the code and keeps going whatever the program does; ``run_programs`` runs many
  programs from a thread pool, each still in its own process.

What it does NOT guarantee -- **it is not a container, a VM or a seccomp jail**:

* CPython's documentation states that audit hooks are not a security boundary. A deliberate adversary who knows
  CPython internals can get around them: e.g. by writing a shared library into the work directory and loading it
  with ``importlib``'s extension loader, re-creating a builtin module through ``_imp``, interpreter
  memory-corruption bugs, mutating the path object handed to ``open`` between the check and the use
  (``__fspath__`` returning different values), or tampering with the runner's frame through introspection.
  Native code (C extensions, anything loaded with ``dlopen``) is not audited at all.
* The child runs with the host's user id: when the host is root, so is the program (``RLIMIT_NPROC`` then has no
  effect and any escape from the hook is an escape as root). Run this under an unprivileged user, or inside a
  container/VM/nsjail, for code that may be actively hostile.
* Not restricted: reading metadata anywhere (``os.stat``, ``os.listdir``, ``os.scandir``); reading any file when
  ``restrict_reads=False``; reads done by C libraries (e.g. NSS reading ``/etc/passwd`` for ``pwd``); filling the
  disk with many files of up to ``file_size_mb`` each inside the work directory within the time limit; the
  kernel's shared resources (CPU caches, timing side channels, ``/proc`` and ``/sys`` information); signals to the
  program's own threads. It is Linux-only (it relies on ``/proc/self/fd`` and ``RLIMIT_*`` semantics).
* ``RLIMIT_AS`` limits virtual memory, not resident memory; a program may still make the host swap a little
  before it hits its limit, and ``memory_mb`` must leave room for the interpreter (~30 MB).
"""

from __future__ import annotations

import functools
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_program", "run_programs", "STATUSES"]

#: Possible values of :attr:`SandboxResult.status`.
STATUSES = ("passed", "failed", "timeout", "error")

_PROGRAM_NAME = "program.py"
_EXTRA_READ_PATHS = (
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/usr/share/zoneinfo",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/mime.types",
    "/etc/os-release",
    "/usr/lib/os-release",
)

#: The child's runner (:mod:`dfm_hf.evaluation.sandbox_child`), started by path: isolated mode cannot import dfm_hf.
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")

_REFUSED_EVENTS = (
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.kill",
    "os.killpg",
    "os.link",
    "os.symlink",
    "os.startfile",
    "signal.pthread_kill",
    "subprocess.Popen",
    "pty.spawn",
    "resource.setrlimit",
    "resource.prlimit",
    "sys.addaudithook",
    "code.__new__",
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
    "_posixsubprocess.fork_exec",
)
_REFUSED_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "winreg.", "_winapi.")
_REFUSED_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess", "posix", "_xxsubinterpreters", "_xxinterpchannels")
_REMOVED_FUNCTIONS = (
    "_exit",
    "mknod",
    "chroot",
    "setuid",
    "seteuid",
    "setreuid",
    "setresuid",
    "setgid",
    "setegid",
    "setregid",
    "setresgid",
    "setgroups",
    "initgroups",
    "setsid",
    "setpgid",
    "setpgrp",
    "setpriority",
    "sched_setaffinity",
    "sched_setscheduler",
    "sched_setparam",
    "pidfd_open",
    "memfd_create",
)


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program run by :func:`run_program`.

    ``status`` is one of :data:`STATUSES`: ``"passed"`` (ran to its end, exit status 0), ``"failed"`` (an uncaught
    exception, ``SystemExit``, a signal or a resource limit other than CPU time), ``"timeout"`` (wall-clock timeout
    or CPU-time limit) or ``"error"`` (the sandbox itself could not run the program). ``stdout``/``stderr`` hold at
    most the last ``max_output_bytes`` bytes of each stream (decoded as UTF-8 with replacement).
    ``returncode`` is the child's exit status (negative: killed by that signal; ``None``: never started).
    ``duration`` is the wall-clock time in seconds.
    """

    passed: bool
    status: str
    stdout: str
    stderr: str
    returncode: int | None
    duration: float

    @property
    def message(self) -> str:
        """A one-line summary in the style of ``code_eval``: ``passed``, ``timed out`` or ``failed: <reason>``."""
        if self.status == "passed":
            return "passed"
        if self.status == "timeout":
            return "timed out"
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {self.returncode}"
        return f"{self.status}: {reason}"


@functools.cache
def _stdlib_read_roots() -> tuple[str, ...]:
    """Directories (and zip files) the child's standard library is read from."""
    roots: list[str] = []
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.append(path)
    version = f"python{sys.version_info.major}{sys.version_info.minor}"
    for prefix in {sys.base_prefix, sys.base_exec_prefix}:
        roots.append(os.path.join(prefix, "lib", f"{version}.zip"))
    resolved = {os.path.realpath(p) for p in roots} | set(roots)
    return tuple(sorted(resolved))


def _read_tail(f, limit: int) -> str:
    """Last ``limit`` bytes of the binary file object ``f``, decoded."""
    f.flush()
    size = f.seek(0, os.SEEK_END)
    start = max(0, size - limit)
    f.seek(start)
    data = f.read()
    text = data.decode("utf-8", errors="replace")
    return ("...[truncated]\n" + text) if start > 0 else text


def _remove_tree(path: str) -> None:
    """Delete ``path`` recursively, making read-only directories writable first when needed."""

    def retry(func, failed_path, _exc):  # pragma: no cover - only after hostile permission changes
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            func(failed_path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until the child ``pid`` exits, without reaping it; False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # old kernel or Python: poll instead
        pidfd = None
    delay = 0.001
    try:
        while True:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:  # already reaped elsewhere
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, 0.05)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(
    code: str,
    timeout: float = 5.0,
    memory_mb: int = 512,
    *,
    file_size_mb: int = 16,
    max_output_bytes: int = 65536,
    as_main: bool = True,
    restrict_reads: bool = True,
    extra_read_paths: Iterable[str] = (),
) -> SandboxResult:
    """Run the Python source ``code`` in a fresh sandboxed process and report how it ended.

    Args:
        code: the program (a complete module's source).
        timeout: wall-clock limit in seconds; the CPU-time limit is ``ceil(timeout) + 1`` seconds.
        memory_mb: address-space limit of the process, in MiB.
        file_size_mb: largest file the program may write (stdout and stderr included), in MiB.
        max_output_bytes: how many trailing bytes of stdout and of stderr are kept in the result.
        as_main: run the program with ``__name__ == "__main__"``; ``False`` uses ``"__sandbox__"`` so that
            ``if __name__ == "__main__":`` blocks are skipped, as in the Hub's ``code_eval`` (whose ``exec`` of an
            empty namespace does not set ``__name__`` either).
        restrict_reads: refuse reading files other than the work directory's, the standard library's and a few
            harmless system files (see module docstring); ``False`` allows reading anything the user can read.
        extra_read_paths: further files or directories the program may read when ``restrict_reads`` is on.

    Returns:
        A :class:`SandboxResult`. It never raises for anything the program does.

    Raises:
        ValueError: an argument is out of range (named in the message).
    """
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 32):
        raise ValueError(f"memory_mb must be an int >= 32, got {memory_mb!r}")
    if not (isinstance(file_size_mb, int) and file_size_mb >= 1):
        raise ValueError(f"file_size_mb must be an int >= 1, got {file_size_mb!r}")
    if not (isinstance(max_output_bytes, int) and max_output_bytes >= 0):
        raise ValueError(f"max_output_bytes must be an int >= 0, got {max_output_bytes!r}")

    start = time.monotonic()
    root = os.path.realpath(tempfile.mkdtemp(prefix="dfm_sandbox_"))
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir, 0o700)
        program = os.path.join(root, _PROGRAM_NAME)
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        read_roots = None
        if restrict_reads:
            extra = tuple(os.path.realpath(os.path.abspath(p)) for p in extra_read_paths)
            read_roots = (*_stdlib_read_roots(), *_EXTRA_READ_PATHS, *extra, program)
        mib = 1024 * 1024
        cpu_seconds = int(math.ceil(timeout)) + 1
        config = {
            "workdir": workdir,
            "program": program,
            "module_name": "__main__" if as_main else "__sandbox__",
            "read_roots": read_roots,
            "limits": (
                ("RLIMIT_CPU", cpu_seconds, cpu_seconds + 1),
                ("RLIMIT_AS", memory_mb * mib, memory_mb * mib),
                ("RLIMIT_FSIZE", file_size_mb * mib, file_size_mb * mib),
                ("RLIMIT_NOFILE", 128, 128),
                ("RLIMIT_CORE", 0, 0),
                ("RLIMIT_NPROC", 0, 0),
            ),
            "refused_events": _REFUSED_EVENTS,
            "refused_prefixes": _REFUSED_PREFIXES,
            "refused_imports": _REFUSED_IMPORTS,
            "removed_functions": _REMOVED_FUNCTIONS,
        }
        env = {
            "PATH": os.defpath,
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "HOME": workdir,
            "TMPDIR": workdir,
        }
        argv = [sys.executable, "-I", "-S", "-B", "-u", _CHILD, json.dumps(config)]
        with (
            open(os.path.join(root, "stdout"), "w+b") as out,
            open(os.path.join(root, "stderr"), "w+b") as err,
        ):
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    close_fds=True,
                    start_new_session=True,
                )
            except OSError as exc:
                return SandboxResult(False, "error", "", f"sandbox: could not start: {exc}", None, 0.0)
            try:
                timed_out = not _wait_for_exit(proc.pid, timeout)
            finally:
                # The leader is still alive or a zombie (not reaped yet), so its group id cannot have been reused:
                # killing the group cannot hit an unrelated process. Then reap it.
                _kill_group(proc.pid)
                returncode = proc.wait()
            duration = time.monotonic() - start
            stdout = _read_tail(out, max_output_bytes)
            stderr = _read_tail(err, max_output_bytes)
    finally:
        _remove_tree(root)

    if timed_out or returncode == -signal.SIGXCPU:
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    else:
        status = "failed"
    return SandboxResult(status == "passed", status, stdout, stderr, returncode, duration)


def run_programs(
    codes: Sequence[str],
    n_workers: int | None = None,
    timeout: float = 5.0,
    memory_mb: int = 512,
    **kwargs,
) -> list[SandboxResult]:
    """Run many programs with :func:`run_program` from a pool of ``n_workers`` threads (one process each).

    Returns the results in the order of ``codes``. ``n_workers`` defaults to ``min(4, os.cpu_count())``; other
    keyword arguments are passed to :func:`run_program`.
    """
    codes = list(codes)
    if n_workers is None:
        n_workers = min(4, os.cpu_count() or 1)
    if not (isinstance(n_workers, int) and n_workers >= 1):
        raise ValueError(f"n_workers must be an int >= 1, got {n_workers!r}")
    for i, code in enumerate(codes):
        if not isinstance(code, str):
            raise ValueError(f"codes[{i}] must be a str, got {type(code).__name__}")
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=min(n_workers, len(codes))) as pool:
        futures = [pool.submit(run_program, code, timeout, memory_mb, **kwargs) for code in codes]
        return [future.result() for future in futures]
