"""The child side of :mod:`dfm_hf.evaluation.sandbox`: the script each sandboxed program runs under.

:func:`dfm_hf.evaluation.sandbox.run_program` starts it by path as ``python -I -S -B -u sandbox_child.py CONFIG``, where
``CONFIG`` is the run's configuration as JSON (work directory, program file, resource limits, the events, imports
and ``os`` functions to refuse). In the child it

1. sets the resource limits (``resource.setrlimit``),
2. reads and compiles the program,
3. installs the audit hook of :func:`_make_hook` and deletes the ``os``/``posix`` functions that raise no audit event,
4. runs the program in a fresh namespace, and exits 0 only if it ran to its end (``posix._exit``: no ``atexit``
   handler or ``finally`` block of the program can change the verdict).

Isolated mode (``-I``) keeps this file's folder off ``sys.path`` and ``-S`` skips ``site``, so it may import the
standard library only: nothing from dfm_hf or any installed package is importable here. See
:mod:`dfm_hf.evaluation.sandbox` for what the sandbox guarantees and what it does not.
"""

from __future__ import annotations


def _make_hook(cfg: dict) -> object:
    """The audit hook ``hook(event, args)`` of one run, configured by ``cfg`` (see
    :func:`dfm_hf.evaluation.sandbox.run_program`).

    Every function and constant it uses is bound here, at install time, so that monkeypatching ``os``, ``builtins``
    or ``posixpath`` from the program cannot change what it does. It raises ``PermissionError`` for what it refuses.
    """
    import _stat
    import posix

    lstat = posix.lstat
    readlink = posix.readlink
    getcwd = posix.getcwd
    fspath = posix.fspath
    stat = posix.stat
    getpid = posix.getpid
    s_islnk = _stat.S_ISLNK
    s_isdir = _stat.S_ISDIR
    _isinstance = isinstance
    _str = str
    _bytes = bytes
    _int = int
    _len = len
    _error = PermissionError
    _oserror = OSError
    workdir = cfg["workdir"]
    write_roots = (workdir,)
    write_files = frozenset(("/dev/null",))
    read_roots = None if cfg["read_roots"] is None else tuple(cfg["read_roots"])  # immutable: JSON gave a list
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    refused_events = frozenset(cfg["refused_events"])
    refused_prefixes = tuple(cfg["refused_prefixes"])
    refused_imports = frozenset(cfg["refused_imports"])

    def refuse(event, detail=""):
        raise _error(f"sandbox: {event} refused{(': ' + detail) if detail else ''}")

    def fd_path(fd):
        try:
            target = readlink(f"/proc/self/fd/{fd:d}")
        except _oserror:
            return None
        return target if target.startswith("/") else None

    def resolve(path, dir_fd=None):
        """Absolute path with every existing symbolic link followed; None when it cannot be told."""
        if _isinstance(path, _int):
            return fd_path(path)
        if path is None:
            return None
        if not _isinstance(path, (_str, _bytes)):
            try:
                path = fspath(path)
            except Exception:
                return None
        if _isinstance(path, _bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            if dir_fd is not None and dir_fd != -1:
                base = fd_path(dir_fd)
                if base is None:
                    return None
            else:
                base = getcwd()
            path = base + "/" + path
        pending = path.split("/")
        pending.reverse()
        out = []
        hops = 0
        while pending:
            part = pending.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            candidate = "/" + "/".join(out) + ("/" if out else "") + part
            try:
                st = lstat(candidate)
            except _oserror:
                out.append(part)
                continue
            if s_islnk(st.st_mode):
                hops += 1
                if hops > 40:
                    return None
                try:
                    target = readlink(candidate)
                except _oserror:
                    return None
                if target.startswith("/"):
                    out = []
                more = target.split("/")
                more.reverse()
                pending.extend(more)
                continue
            out.append(part)
        return "/" + "/".join(out)

    def within(path, roots):
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def check_write(event, path, dir_fd=None):
        real = resolve(path, dir_fd)
        if real is None or not (within(real, write_roots) or real in write_files):
            refuse(event, f"{path!r} is outside the sandbox directory")

    def on_open(args):
        path = args[0]
        mode = args[1] if _len(args) > 1 else None
        flags = args[2] if _len(args) > 2 else 0
        if _isinstance(path, _int):
            return  # an already open descriptor: it went through this check when it was opened
        writing = _isinstance(flags, _int) and (flags & write_flags) != 0
        if _isinstance(mode, _str) and ("w" in mode or "a" in mode or "x" in mode or "+" in mode):
            writing = True
        if writing:
            check_write("open", path)
            return
        real = resolve(path)
        if real is None:
            refuse("open", f"cannot resolve {path!r}")
        if within(real, write_roots):
            return
        if mode is None:  # os.open(): a directory descriptor outside would let dir_fd escape the checks
            try:
                is_dir = s_isdir(stat(real).st_mode)
            except _oserror:
                is_dir = False
            if is_dir:
                refuse("open", f"os.open of directory {path!r} outside the sandbox directory")
        if read_roots is not None:
            own_proc = f"/proc/{getpid():d}"
            if not (within(real, read_roots) or within(real, (own_proc,))):
                refuse("open", f"reading {path!r} is not allowed")

    def on_path1(event):
        def check(args):
            check_write(event, args[0])

        return check

    def on_path_dirfd(event, index):
        def check(args):
            dir_fd = args[index] if _len(args) > index else None
            check_write(event, args[0], dir_fd)

        return check

    def on_rename(args):
        check_write("os.rename", args[0], args[2] if _len(args) > 2 else None)
        check_write("os.rename", args[1], args[3] if _len(args) > 3 else None)

    def on_import(args):
        name = args[0]
        if _isinstance(name, _str):
            top = name.split(".")[0]
            if top in refused_imports or top.startswith("_test"):
                refuse("import", name)

    def on_setattr(args):
        if _len(args) > 1 and args[1] == "__code__":
            refuse("object.__setattr__", "__code__")

    handlers = {
        "open": on_open,
        "os.remove": on_path_dirfd("os.remove", 1),
        "os.rmdir": on_path_dirfd("os.rmdir", 1),
        "os.mkdir": on_path_dirfd("os.mkdir", 2),
        "os.chmod": on_path_dirfd("os.chmod", 2),
        "os.chown": on_path_dirfd("os.chown", 3),
        "os.utime": on_path_dirfd("os.utime", 3),
        "os.truncate": on_path1("os.truncate"),
        "os.setxattr": on_path1("os.setxattr"),
        "os.removexattr": on_path1("os.removexattr"),
        "os.rename": on_rename,
        "import": on_import,
        "object.__setattr__": on_setattr,
    }
    get_handler = handlers.get

    def hook(event, args):
        if event in refused_events or event.startswith(refused_prefixes):
            refuse(event)
        handler = get_handler(event)
        if handler is not None:
            handler(args)

    return hook


def _sandbox_main(cfg: dict) -> None:
    """Set the limits, install the hook, run the program; exit 0 only if it ran to its end (never returns)."""
    import builtins
    import os
    import posix
    import resource
    import sys

    for name, soft, hard in cfg["limits"]:
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass
    exit_now = posix._exit
    report = sys.__excepthook__
    program = cfg["program"]
    sys.argv[:] = [program]  # as `python program.py` would; the runner's own arguments are not the program's
    ok = False
    try:
        with open(program, "rb") as f:
            source = f.read()
        code = compile(source, program, "exec", dont_inherit=True)
        del source
        namespace = {"__name__": cfg["module_name"], "__builtins__": builtins, "__file__": program}
        sys.addaudithook(_make_hook(cfg))
        for name in cfg["removed_functions"]:
            for module in (os, posix):
                try:
                    delattr(module, name)
                except AttributeError:
                    pass
        del os, posix, resource, name, module
        exec(code, namespace)
        ok = True
    except BaseException as exc:
        try:
            if type(exc) is SystemExit:
                sys.stderr.write(f"sandbox: the program raised SystemExit({exc.code!r}) before its end\n")
            tb = exc.__traceback__
            report(type(exc), exc, tb.tb_next if tb is not None and tb.tb_next is not None else tb)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    exit_now(0 if ok else 1)


if __name__ == "__main__":
    import json
    import sys

    _sandbox_main(json.loads(sys.argv[1]))
