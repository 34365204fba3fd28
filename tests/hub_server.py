"""A loopback Hugging Face Hub server for tests (stdlib only).

What it is
----------
``LoopbackHub`` implements the part of the Hugging Face Hub HTTP API that ``huggingface_hub`` 2.x uses, so that the
*real* client (``HfApi``, ``hf_hub_download``, ``snapshot_download``) and the libraries built on it (``transformers`` /
``diffusers`` ``push_to_hub`` and ``from_pretrained``) can be tested without network. It runs a
``ThreadingHTTPServer`` on 127.0.0.1 (port 0 = a free port) in a daemon thread and stores everything under a data
directory (a fresh temporary directory by default, removed by ``stop()``).

Storage is git-like::

    <data_dir>/repos/<models|datasets|spaces>/<namespace>/<name>/
        repo.json             branches and tags (name -> commit id), creation date; the only mutable file
        commits/<sha1>.json   immutable snapshots: parents, title, message, author, date and, per path,
                              {"sha256", "size", "oid" (git blob sha1), "lfs"}
        blobs/<sha256>        file contents, content-addressed, one store per repo
    <data_dir>/tmp/           every file is written there first, then renamed into place (atomic)

A new repo gets an "initial commit" holding a ``.gitattributes`` file, as on the Hub. A file is stored as LFS when it
is larger than ``lfs_threshold`` (10 MiB, the Hub limit for regular files) or when it matches a ``filter=lfs`` rule
of the ``.gitattributes`` at the target revision (the default one tracks ``*.safetensors``, ``*.bin``, ``*.pt``...).

Routes (``{repo}`` is ``{ns}/{name}``, prefixed with ``datasets/`` or ``spaces/`` outside ``/api``)
-----------------------------------------------------------------------------------------------------------
- ``GET /api/whoami-v2``, ``POST /api/validate-yaml`` (only checks the front-matter fences)
- ``POST /api/repos/create`` (409 if it exists), ``DELETE /api/repos/delete``
- ``GET /api/{models,datasets,spaces}/{ns}/{name}[/revision/{rev}]``: ``sha``, ``siblings`` (with ``blobs=true``:
  sizes, blob ids and LFS info), ``expand`` filters the keys
- ``GET .../tree/{rev}[/{path}]`` (``recursive``, ``expand`` adds ``lastCommit``; paginated with a ``Link`` header
  every ``tree_page_size`` entries), ``POST .../paths-info/{rev}`` (form or JSON ``paths``, ``expand``)
- ``POST .../preupload/{rev}`` (``uploadMode``, ``shouldIgnore`` from ``gitIgnore`` or the repo ``.gitignore``,
  ``oid`` of the current file), ``POST .../commit/{rev}`` (NDJSON: ``header``, ``file``, ``lfsFile``,
  ``deletedFile``, ``deletedFolder``; ``parentCommit`` is checked, 412 if stale)
- ``GET .../refs``, ``GET .../commits/{rev}`` (newest first, ``Link`` pagination every ``commits_page_size``)
- ``POST/DELETE .../branch/{name}`` (``startingPoint``), ``POST .../tag/{rev}``, ``DELETE .../tag/{tag}``
- ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer, ``upload`` operation; objects already stored get no
  ``actions``), ``PUT /__lfs__/upload/{type}s/{repo}/{oid}`` (the upload URL handed out: the body must hash to
  ``oid``), ``POST /__lfs__/verify/{type}s/{repo}``
- ``GET/HEAD /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, quoted ``ETag`` (git blob sha1 of the content, or of
  the LFS pointer), ``Content-Length``, ``Range`` (206/416). LFS files also get ``X-Linked-Etag`` (sha256) and
  ``X-Linked-Size`` and, with ``lfs_redirect=True`` (default), a 302 to ``/__cdn__/...`` on ``cdn_endpoint``. That
  host is ``localhost`` instead of ``127.0.0.1``: a different origin, so the client treats it like the Hub's CDN
  (uses the headers of the 302, follows it for the GET and drops the ``Authorization`` header).
- Errors are JSON ``{"error": message}`` with ``X-Error-Message``; 404s carry ``X-Error-Code`` ``RepoNotFound``,
  ``RevisionNotFound`` or ``EntryNotFound`` (plus ``X-Repo-Commit``), which ``huggingface_hub`` maps to its
  ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``RemoteEntryNotFoundError``. Writes need an
  ``Authorization: Bearer`` header (and the configured ``token``, if any), else 401.

Not implemented: pull requests (``create_pr``), Xet storage (clients must set ``HF_HUB_DISABLE_XET=1``), multipart
LFS uploads, private-repo access control, ``refs/pr/*`` and short commit shas as revisions.

How tests use it
----------------
``tests/conftest.py`` starts one hub when it is imported, before anything imports ``huggingface_hub`` (which reads
``HF_ENDPOINT`` once, at import), and exposes it as the session fixture ``hub_server``; ``hub_repo_id`` gives a fresh
repo id per test. Helpers act on the stored bytes behind the API to test error handling: ``corrupt_file`` rewrites
a blob (metadata is kept, so ``ETag``/size no longer match) and ``delete_file`` removes it. With ``verify_blobs=True``
(default) a GET of a blob whose content no longer hashes to its address is answered 500 (``X-Error-Code:
BlobCorrupted``); ``hf_hub_download`` does not retry a failing GET, so it raises ``HfHubHTTPError`` at once, but
callers going through ``http_backoff`` (e.g. ``HfFileSystem``) retry 500s for ~20 s first. With
``verify_blobs=False`` the bytes are served as they are, like a dumb CDN. ``requests`` records every request
(method, path, status). Set ``LOOPBACK_HUB_LOG=1`` to print requests (and nothing else) to stderr.

Blobs are shared by all revisions of a repo: corrupting a blob corrupts every path and revision holding those bytes.
"""

import base64
import binascii
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = ["LoopbackHub", "LoggedRequest", "HubError", "LFS_THRESHOLD"]

LFS_THRESHOLD = 10 * 1024 * 1024
DEFAULT_BRANCH = "main"
USER_NAME = "loopback-user"
LOG_ENV_VAR = "LOOPBACK_HUB_LOG"

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_PREFIX = "__lfs__"
CDN_PREFIX = "__cdn__"
_COPY_CHUNK = 1024 * 1024

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)

_LFS_EXTENSIONS = (
    "7z arrow bin bz2 ckpt ftz gguf gz h5 joblib mlmodel model msgpack npy npz onnx ot parquet pb pickle pkl pt pth "
    "rar safetensors tar tflite tgz wasm xz zip zst"
).split()
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in [*(f"*.{ext}" for ext in _LFS_EXTENSIONS), "*.tar.*", "*tfevents*", "saved_model/**/*"]
)


class HubError(Exception):
    """An error answered as ``{"error": message, **body}`` with ``status``, ``X-Error-Code`` and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _entry_not_found(path: str, commit_id: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit_id} if commit_id else {}
    return HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)


class Entry(TypedDict):
    """One file of a commit snapshot."""

    sha256: str  # address of the content in blobs/
    size: int
    oid: str  # git blob sha1 of the content (regular file) or of the LFS pointer (LFS file)
    lfs: bool


@dataclass(frozen=True)
class LoggedRequest:
    """A request served by the hub (``path`` includes the query string)."""

    method: str
    path: str
    status: int


# --------------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------------


def _now() -> str:
    """Current UTC time in the Hub's ISO format."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    """Git object id of a blob (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _clean_path(path: Any) -> str:
    """Validate a path in a repo ("a/b.txt"): relative, no empty, "." or ".." parts, nothing under ".git"."""
    if not isinstance(path, str):
        raise HubError(400, f"Invalid path: {path!r}")
    parts = path.lstrip("/").split("/")
    if any(part in ("", ".", "..", ".git") for part in parts):
        raise HubError(400, f"Invalid path: {path!r}")
    return "/".join(parts)


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


def _patterns(text: str, *, lfs_only: bool) -> list[str]:
    """Patterns of a ``.gitattributes`` (only ``filter=lfs`` lines) or of a ``.gitignore`` file."""
    patterns = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith(("#", "!")):
            continue
        if not lfs_only or "filter=lfs" in words[1:]:
            patterns.append(words[0])
    return patterns


def _matches(path: str, pattern: str) -> bool:
    """Approximate git wildmatch: a pattern without "/" matches any path component, "dir/" any folder."""
    if pattern.endswith("/"):
        folders = path.split("/")[:-1]
        return any(_matches(folder, pattern.rstrip("/")) for folder in folders)
    if "/" not in pattern:
        return any(fnmatch.fnmatchcase(part, pattern) for part in path.split("/"))
    pattern = pattern.lstrip("/")
    if pattern.endswith("/**"):
        return path.startswith(pattern[:-2])
    return fnmatch.fnmatchcase(path, pattern.replace("**/", "*"))


def _path_state(files: dict[str, Entry], path: str) -> tuple[tuple[str, str], ...]:
    """What identifies the content of a file or folder in a snapshot (empty if absent)."""
    if path in files:
        return ((path, files[path]["oid"]),)
    prefix = f"{path}/" if path else ""
    return tuple(sorted((p, e["oid"]) for p, e in files.items() if p.startswith(prefix)))


def _folder_oid(files: dict[str, Entry], path: str) -> str:
    return hashlib.sha1(repr(_path_state(files, path)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Storage (no HTTP here)
# --------------------------------------------------------------------------------------------------------------------


class _Storage:
    """Repos, refs, immutable commits and content-addressed blobs under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()  # serialises every read-modify-write of repo.json
        self._commits: dict[tuple[str, str], dict[str, Any]] = {}  # commits are immutable: cache them

    # -- files ----------------------------------------------------------------------------------------------------

    def atomic_write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to a temporary file, then rename it over ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def repo_root(self, repo_type: str, repo_id: str) -> Path:
        namespace, name = repo_id.split("/")
        return self.root / "repos" / f"{repo_type}s" / namespace / name

    def blob_file(self, root: Path, sha256: str) -> Path:
        return root / "blobs" / sha256

    def has_blob(self, root: Path, sha256: str, size: int) -> bool:
        blob = self.blob_file(root, sha256)
        return blob.is_file() and blob.stat().st_size == size

    def store_bytes(self, root: Path, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_blob(root, sha256, len(data)):
            self.atomic_write(self.blob_file(root, sha256), data)
        return sha256

    def store_stream(self, root: Path, chunks: Iterable[bytes], sha256: str) -> None:
        """Store a streamed upload that must hash to ``sha256``."""
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as file:
                for chunk in chunks:
                    digest.update(chunk)
                    file.write(chunk)
            if digest.hexdigest() != sha256:
                raise HubError(400, f"Uploaded content does not match its oid: sha256 is {digest.hexdigest()}")
            blob = self.blob_file(root, sha256)
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, blob)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_blob_text(self, root: Path, entry: Entry | None) -> str:
        if entry is None:
            return ""
        try:
            return self.blob_file(root, entry["sha256"]).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # -- repos and refs ------------------------------------------------------------------------------------------

    def read_meta(self, repo_type: str, repo_id: str) -> tuple[Path, dict[str, Any]]:
        root = self.repo_root(repo_type, repo_id)
        try:
            return root, json.loads((root / "repo.json").read_text())
        except FileNotFoundError:
            raise _repo_not_found(repo_id) from None

    def write_meta(self, root: Path, meta: dict[str, Any]) -> None:
        self.atomic_write(root / "repo.json", json.dumps(meta, indent=1).encode())

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create a repo with an initial commit holding ``.gitattributes``; False if it already exists."""
        root = self.repo_root(repo_type, repo_id)
        with self.lock:
            if (root / "repo.json").exists():
                return False
            data = DEFAULT_GITATTRIBUTES.encode()
            entry = Entry(sha256=self.store_bytes(root, data), size=len(data), oid=_git_blob_oid(data), lfs=False)
            commit_id = self.write_commit(root, [], {".gitattributes": entry}, "initial commit", "", "system")
            meta = {
                "id": repo_id,
                "type": repo_type,
                "private": private,
                "createdAt": _now(),
                "branches": {DEFAULT_BRANCH: commit_id},
                "tags": {},
            }
            self.write_meta(root, meta)
            return True

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            root, _ = self.read_meta(repo_type, repo_id)
            graveyard = Path(tempfile.mkdtemp(dir=self.tmp_dir))
            os.replace(root, graveyard / "repo")  # the repo disappears atomically, then is removed
            self._commits = {key: value for key, value in self._commits.items() if key[0] != str(root)}
        shutil.rmtree(graveyard, ignore_errors=True)

    def resolve(self, root: Path, meta: dict[str, Any], revision: str) -> str:
        """Commit id of a branch, a tag or a full commit sha."""
        if revision in meta["branches"]:
            return meta["branches"][revision]
        if revision in meta["tags"]:
            return meta["tags"][revision]
        if _SHA1_RE.fullmatch(revision) and (root / "commits" / f"{revision}.json").is_file():
            return revision
        raise _revision_not_found(revision)

    # -- commits ---------------------------------------------------------------------------------------------------

    def commit(self, root: Path, commit_id: str) -> dict[str, Any]:
        key = (str(root), commit_id)
        if key not in self._commits:
            self._commits[key] = json.loads((root / "commits" / f"{commit_id}.json").read_text())
        return self._commits[key]

    def snapshot(self, repo_type: str, repo_id: str, revision: str) -> tuple[Path, str, dict[str, Entry]]:
        """(repo root, commit id, files) of a revision."""
        root, meta = self.read_meta(repo_type, repo_id)
        commit_id = self.resolve(root, meta, revision)
        return root, commit_id, self.commit(root, commit_id)["files"]

    def history(self, root: Path, commit_id: str) -> Iterator[dict[str, Any]]:
        """Commits reachable by first parents, newest first."""
        current: str | None = commit_id
        while current is not None:
            commit = self.commit(root, current)
            yield commit
            current = commit["parents"][0] if commit["parents"] else None

    def write_commit(
        self, root: Path, parents: list[str], files: dict[str, Entry], title: str, message: str, author: str
    ) -> str:
        commit = {"parents": parents, "title": title, "message": message, "author": author, "date": _now()}
        commit["files"] = dict(sorted(files.items()))
        commit_id = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
        commit["id"] = commit_id
        self.atomic_write(root / "commits" / f"{commit_id}.json", json.dumps(commit).encode())
        return commit_id

    def create_commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        header: dict[str, Any],
        operations: list[dict[str, Any]],
        max_regular_size: int,
    ) -> str:
        """Apply NDJSON commit operations on top of ``branch`` and move the branch; return the commit id.

        Regular ("file") contents larger than ``max_regular_size`` are refused: they must be LFS files.
        """
        root, _ = self.read_meta(repo_type, repo_id)
        staged: list[tuple[str, str, Entry | None]] = []
        for operation in operations:  # blobs are written first, outside the lock
            key, value = operation.get("key"), operation.get("value") or {}
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "Only base64 encoded file contents are supported")
                try:
                    data = base64.b64decode(value.get("content", ""), validate=True)
                except (binascii.Error, ValueError):
                    raise HubError(400, f"Invalid base64 content for {value.get('path')!r}") from None
                if len(data) > max_regular_size:
                    raise HubError(400, f"{value.get('path')!r} is too large for a regular file: use LFS")
                sha256 = self.store_bytes(root, data)
                entry = Entry(sha256=sha256, size=len(data), oid=_git_blob_oid(data), lfs=False)
                staged.append(("add", _clean_path(value.get("path")), entry))
            elif key == "lfsFile":
                oid = str(value.get("oid"))
                blob = self.blob_file(root, oid)
                if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.fullmatch(oid) or not blob.is_file():
                    raise HubError(400, f"LFS object {oid} of {value.get('path')!r} has not been uploaded")
                size = blob.stat().st_size
                if value.get("size", size) != size:
                    raise HubError(400, f"LFS object {oid} has size {size}, not {value.get('size')}")
                entry = Entry(sha256=oid, size=size, oid=_git_blob_oid(_lfs_pointer(oid, size)), lfs=True)
                staged.append(("add", _clean_path(value.get("path")), entry))
            elif key == "deletedFile":
                staged.append(("delete_file", _clean_path(value.get("path")), None))
            elif key == "deletedFolder":
                staged.append(("delete_folder", _clean_path(str(value.get("path", "")).rstrip("/")), None))
            else:
                raise HubError(400, f"Unsupported commit operation: {key!r}")

        with self.lock:
            root, meta = self.read_meta(repo_type, repo_id)
            if branch not in meta["branches"]:
                if branch in meta["tags"] or _SHA1_RE.fullmatch(branch):
                    raise HubError(400, f"Invalid rev id: {branch}: commits can only be made on a branch")
                raise _revision_not_found(branch)
            head = meta["branches"][branch]
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files: dict[str, Entry] = dict(self.commit(root, head)["files"])
            for kind, path, entry in staged:
                if entry is not None:
                    files[path] = entry
                elif kind == "delete_file":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    under = [p for p in files if p.startswith(f"{path}/")]
                    if not under:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in under:
                        del files[p]
            for path in files:
                parts = path.split("/")
                if any("/".join(parts[:i]) in files for i in range(1, len(parts))):
                    raise HubError(400, f"Cannot create {path!r}: one of its parent folders is a file")
            title = str(header.get("summary") or "").strip() or "Update files"
            commit_id = self.write_commit(root, [head], files, title, str(header.get("description") or ""), USER_NAME)
            meta["branches"][branch] = commit_id
            self.write_meta(root, meta)
            return commit_id

    def update_ref(
        self, repo_type: str, repo_id: str, kind: str, name: str, target: str | None, *, create: bool
    ) -> None:
        """Create (``create=True``, 409 if it exists) or delete (404 if missing) a branch or a tag."""
        with self.lock:
            root, meta = self.read_meta(repo_type, repo_id)
            refs: dict[str, str] = meta[kind]
            if create:
                if name in refs:
                    raise HubError(409, f"Reference already exists: {name}")
                refs[name] = self.resolve(root, meta, target or DEFAULT_BRANCH)
            else:
                if name not in refs:
                    raise _revision_not_found(name)
                if kind == "branches" and name == DEFAULT_BRANCH:
                    raise HubError(400, "Cannot delete the default branch")
                del refs[name]
            self.write_meta(root, meta)


# --------------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens several connections at once

    def __init__(self, address: tuple[str, int], hub: "LoopbackHub"):
        super().__init__(address, _Handler)
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP/1.1 request (keep-alive) to the storage."""

    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    server: _Server

    # -- plumbing --------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = int(code) if isinstance(code, int) else 0
        self.server.hub.requests.append(LoggedRequest(self.command, self.path, status))
        if os.environ.get(LOG_ENV_VAR):
            sys.stderr.write(f"[loopback-hub] {self.command} {self.path} -> {status}\n")

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default access log."""

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    @property
    def hub(self) -> "LoopbackHub":
        return self.server.hub

    @property
    def storage(self) -> _Storage:
        return self.server.hub.storage

    def _handle(self) -> None:
        self._body_state = "unread"  # unread -> reading -> done
        self._headers_sent = False
        url = urlsplit(self.path)
        self._query = parse_qs(url.query, keep_blank_values=True)
        try:
            self._route([unquote(segment) for segment in url.path.split("/")[1:]])
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # a bug of the hub: report it loudly but keep serving
            traceback.print_exc(file=sys.stderr)
            self._send_error(HubError(500, f"LoopbackHub internal error: {error!r}"))
        if self._body_state == "unread":
            self._drain_body()
        elif self._body_state == "reading":  # body left half-read: the connection cannot be reused
            self.close_connection = True

    def _param(self, name: str, default: str = "") -> str:
        return self._query.get(name, [default])[0]

    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body (Content-Length or chunked)."""
        self._body_state = "reading"
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16):
                yield from self._read_exactly(size)
                self.rfile.readline(1024)
            while self.rfile.readline(1024).strip():  # trailers
                pass
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))
        self._body_state = "done"

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size > 0:
            chunk = self.rfile.read(min(size, _COPY_CHUNK))
            if not chunk:
                raise ConnectionResetError("client closed the connection in the middle of the body")
            size -= len(chunk)
            yield chunk

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _drain_body(self) -> None:
        try:
            for _ in self._iter_body():
                pass
        except (OSError, ValueError):
            self.close_connection = True

    def _json_body(self) -> dict[str, Any]:
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise HubError(400, "The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HubError(400, "The request body must be a JSON object")
        return body

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, length: int | None = None
    ) -> None:
        """Send status, headers and (except for HEAD) ``body``; ``length`` overrides Content-Length."""
        self.send_response(status)
        all_headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        all_headers["Content-Length"] = str(len(body) if length is None else length)
        for key, value in all_headers.items():
            self.send_header(key, value)
        self.end_headers()
        self._headers_sent = True
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, error: HubError) -> None:
        if self._headers_sent:  # too late for a clean error: drop the connection
            self.close_connection = True
            return
        if self._body_state == "unread":
            self._drain_body()
        message = " ".join(error.message.split()).encode("ascii", "backslashreplace").decode()
        headers = {"X-Error-Message": message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message, **error.body}, error.status, headers)

    def _require_auth(self) -> None:
        """Writes need a bearer token (the hub's ``token`` if it has one)."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError(401, "Authorization header with a Bearer token is required for this request")
        if self.hub.token is not None and token.strip() != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _next_link(self, **params: int) -> dict[str, str]:
        """``Link`` header to the same URL with updated query ``params`` (GitHub-style pagination)."""
        url = urlsplit(self.path)
        query = {**self._query, **{key: [str(value)] for key, value in params.items()}}
        return {"Link": f'<{self.hub.endpoint}{url.path}?{urlencode(query, doseq=True)}>; rel="next"'}

    # -- routing ---------------------------------------------------------------------------------------------------

    def _route(self, segments: list[str]) -> None:
        method = self.command
        if segments[:1] == ["api"]:
            return self._route_api(method, segments[1:])
        if segments[:2] == [LFS_PREFIX, "upload"] and len(segments) == 6 and method == "PUT":
            return self._lfs_upload(REPO_TYPES.get(segments[2], ""), f"{segments[3]}/{segments[4]}", segments[5])
        if segments[:2] == [LFS_PREFIX, "verify"] and len(segments) == 5 and method == "POST":
            return self._lfs_verify(REPO_TYPES.get(segments[2], ""), f"{segments[3]}/{segments[4]}")
        if segments[:1] == [CDN_PREFIX] and len(segments) == 5 and method in ("GET", "HEAD"):
            return self._cdn(REPO_TYPES.get(segments[1], ""), f"{segments[2]}/{segments[3]}", segments[4])
        repo_type = "model"
        if segments[:1] in (["datasets"], ["spaces"]):
            repo_type, segments = REPO_TYPES[segments[0]], segments[1:]
        if len(segments) == 6 and segments[1].endswith(".git") and segments[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                return self._lfs_batch(repo_type, f"{segments[0]}/{segments[1][:-4]}")
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]))
        raise HubError(404, f"Sorry, LoopbackHub has no route for {method} {urlsplit(self.path).path}")

    def _route_api(self, method: str, segments: list[str]) -> None:
        match method, segments:
            case "GET", ["whoami-v2"]:
                return self._whoami()
            case "POST", ["validate-yaml"]:
                return self._validate_yaml()
            case "POST", ["repos", "create"]:
                return self._create_repo()
            case "DELETE", ["repos", "delete"]:
                return self._delete_repo()
            case _, [plural, namespace, name, *rest] if plural in REPO_TYPES:
                return self._route_repo(method, REPO_TYPES[plural], f"{namespace}/{name}", rest)
        raise HubError(404, f"Sorry, LoopbackHub has no route for {method} /api/{'/'.join(segments)}")

    def _route_repo(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> None:
        match method, rest:
            case "GET", []:
                return self._repo_info(repo_type, repo_id, DEFAULT_BRANCH)
            case "GET", ["revision", revision]:
                return self._repo_info(repo_type, repo_id, revision)
            case "GET", ["tree", revision, *path]:
                return self._tree(repo_type, repo_id, revision, "/".join(path).strip("/"))
            case "POST", ["paths-info", revision]:
                return self._paths_info(repo_type, repo_id, revision)
            case "POST", ["preupload", revision]:
                return self._preupload(repo_type, repo_id, revision)
            case "POST", ["commit", revision]:
                return self._commit(repo_type, repo_id, revision)
            case "GET", ["refs"]:
                return self._refs(repo_type, repo_id)
            case "GET", ["commits", revision]:
                return self._commits(repo_type, repo_id, revision)
            case "POST" | "DELETE", ["branch", branch]:
                return self._branch(repo_type, repo_id, branch)
            case "POST" | "DELETE", ["tag", name]:
                return self._tag(repo_type, repo_id, name)
        raise HubError(404, f"Sorry, LoopbackHub has no route for {method} {urlsplit(self.path).path}")

    # -- account and repos -----------------------------------------------------------------------------------------

    def _whoami(self) -> None:
        self._require_auth()
        access_token = {"displayName": "loopback", "role": "write", "createdAt": "2024-01-01T00:00:00.000Z"}
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": USER_NAME,
                "fullname": "Loopback User",
                "email": f"{USER_NAME}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": access_token},
            }
        )

    def _validate_yaml(self) -> None:
        content = str(self._json_body().get("content", ""))
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and "---" not in (line.strip() for line in lines[1:]):
            message = "The YAML metadata block of README.md is not closed by a '---' line"
            self._send_json({"error": message, "errors": [{"message": message}], "warnings": []}, 400)
            return
        self._send_json({"errors": [], "warnings": []})

    def _repo_id_from_body(self, body: dict[str, Any]) -> tuple[str, str]:
        repo_type = body.get("type") or "model"
        namespace, name = body.get("organization") or USER_NAME, body.get("name")
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        for part in (namespace, name):
            if not isinstance(part, str) or not _NAME_RE.fullmatch(part) or part.endswith(".git") or ".." in part:
                raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        return repo_type, f"{namespace}/{name}"

    def _create_repo(self) -> None:
        self._require_auth()
        body = self._json_body()
        repo_type, repo_id = self._repo_id_from_body(body)
        url = f"{self.hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        private = body.get("visibility") == "private" or body.get("private") is True
        if not self.storage.create_repo(repo_type, repo_id, private):
            # `create_repo(exist_ok=True)` reads the url from this 409 answer
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._require_auth()
        self.storage.delete_repo(*self._repo_id_from_body(self._json_body()))
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        root, meta = self.storage.read_meta(repo_type, repo_id)
        commit_id = self.storage.resolve(root, meta, revision)
        commit = self.storage.commit(root, commit_id)
        blobs = _truthy(self._param("blobs"))
        siblings = []
        for path, entry in commit["files"].items():
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
                    sibling["lfs"] = {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit_id,
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(entry["size"] for entry in commit["files"].values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if expand := self._query.get("expand"):
            info = {key: value for key, value in info.items() if key in {"_id", "id", *expand}}
        self._send_json(info)

    # -- listing ---------------------------------------------------------------------------------------------------

    def _path_info(self, files: dict[str, Entry], path: str) -> dict[str, Any]:
        """Tree entry of a file or folder, as in ``/tree`` and ``/paths-info`` responses."""
        entry = files.get(path)
        if entry is None:
            return {"type": "directory", "oid": _folder_oid(files, path), "path": path}
        info: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
            info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
        return info

    def _add_last_commits(self, root: Path, commit_id: str, infos: list[dict[str, Any]]) -> None:
        """Set ``lastCommit`` (the newest commit that changed the path) on tree entries."""
        pending = {info["path"]: info for info in infos}
        for commit in self.storage.history(root, commit_id):
            parents = commit["parents"]
            parent_files = self.storage.commit(root, parents[0])["files"] if parents else {}
            for path in list(pending):
                if _path_state(commit["files"], path) != _path_state(parent_files, path):
                    last = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
                    pending.pop(path)["lastCommit"] = last
            if not pending:
                return

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        root, commit_id, files = self.storage.snapshot(repo_type, repo_id, revision)
        prefix = f"{path}/" if path else ""
        under = [p for p in files if p.startswith(prefix)]
        if path and not under:
            raise _entry_not_found(path, commit_id)
        recursive, expand = _truthy(self._param("recursive")), _truthy(self._param("expand"))
        paths: set[str] = set()
        for file_path in under:
            parts = file_path[len(prefix) :].split("/")
            if recursive:
                paths.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts) + 1))
            else:
                paths.add(prefix + parts[0])
        page_size = min(self.hub.tree_page_size, 50) if expand else self.hub.tree_page_size
        start = int(self._param("cursor", "0") or 0)
        ordered = sorted(paths)
        page = [self._path_info(files, p) for p in ordered[start : start + page_size]]
        if expand:
            self._add_last_commits(root, commit_id, page)
        more = start + page_size < len(ordered)
        self._send_json(page, headers=self._next_link(cursor=start + page_size) if more else None)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        if "json" in self.headers.get("Content-Type", ""):
            body = self._json_body()
            paths, expand = body.get("paths", []), body.get("expand", False)
        else:
            form = parse_qs(self._read_body().decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[0]
        root, commit_id, files = self.storage.snapshot(repo_type, repo_id, revision)
        infos = []
        for path in dict.fromkeys(str(p).strip("/") for p in paths):
            if path in files or any(p.startswith(f"{path}/") for p in files):
                infos.append(self._path_info(files, path))
        if _truthy(expand):
            self._add_last_commits(root, commit_id, infos)
        self._send_json(infos)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        _, meta = self.storage.read_meta(repo_type, repo_id)

        def refs(kind: str, prefix: str) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"{prefix}{name}", "targetCommit": target}
                for name, target in sorted(meta[kind].items())
            ]

        branches, tags = refs("branches", "refs/heads/"), refs("tags", "refs/tags/")
        self._send_json({"branches": branches, "tags": tags, "converts": [], "pullRequests": []})

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        root, commit_id, _ = self.storage.snapshot(repo_type, repo_id, revision)
        formatted = "formatted" in self._query.get("expand[]", [])
        page_size, page_index = self.hub.commits_page_size, int(self._param("p", "0") or 0)
        history = list(self.storage.history(root, commit_id))
        items = []
        for commit in history[page_index * page_size : (page_index + 1) * page_size]:
            item = {
                "id": commit["id"],
                "title": commit["title"],
                "message": commit["message"],
                "authors": [{"user": commit["author"], "avatar": None}],
                "date": commit["date"],
            }
            if formatted:
                item["formatted"] = {"title": commit["title"], "message": commit["message"]}
            items.append(item)
        more = (page_index + 1) * page_size < len(history)
        self._send_json(items, headers=self._next_link(p=page_index + 1) if more else None)

    # -- writes ----------------------------------------------------------------------------------------------------

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_auth()
        body = self._json_body()
        root, commit_id, files = self.storage.snapshot(repo_type, repo_id, revision)
        lfs_patterns = _patterns(self.storage.read_blob_text(root, files.get(".gitattributes")), lfs_only=True)
        gitignore = body.get("gitIgnore")
        if not isinstance(gitignore, str):
            gitignore = self.storage.read_blob_text(root, files.get(".gitignore"))
        ignore_patterns = _patterns(gitignore, lfs_only=False)
        results = []
        for item in body.get("files", []):
            path = _clean_path(item.get("path"))
            is_lfs = int(item.get("size", 0)) > self.hub.lfs_threshold or any(_matches(path, p) for p in lfs_patterns)
            result = {
                "path": item["path"],
                "uploadMode": "lfs" if is_lfs else "regular",
                "shouldIgnore": any(_matches(path, p) for p in ignore_patterns),
            }
            if (existing := files.get(path)) is not None:
                result["oid"] = existing["sha256"] if existing["lfs"] else existing["oid"]
            results.append(result)
        self._send_json({"files": results, "commitOid": commit_id})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_auth()
        if _truthy(self._param("create_pr")):
            raise HubError(400, "Pull requests are not supported by LoopbackHub")
        try:
            lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "The commit payload is not valid NDJSON") from None
        if not lines or not isinstance(lines[0], dict) or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header, operations = lines[0].get("value") or {}, lines[1:]
        commit_id = self.storage.create_commit(
            repo_type, repo_id, revision, header, operations, max_regular_size=self.hub.lfs_threshold
        )
        commit_url = f"{self.hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{commit_id}"
        self._send_json({"success": True, "commitOid": commit_id, "commitUrl": commit_url, "pullRequestUrl": None})

    def _branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        self._require_auth()
        create = self.command == "POST"
        starting_point = self._json_body().get("startingPoint") if create else None
        if create and (branch.startswith("refs/") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", branch) or ".." in branch):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        self.storage.update_ref(repo_type, repo_id, "branches", branch, starting_point, create=create)
        self._send_json({})

    def _tag(self, repo_type: str, repo_id: str, name: str) -> None:
        """POST tag/{revision} with {"tag": name} creates a tag; DELETE tag/{name} deletes it."""
        self._require_auth()
        if self.command == "POST":
            tag = self._json_body().get("tag")
            if not isinstance(tag, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", tag) or ".." in tag:
                raise HubError(400, f"Invalid tag name: {tag!r}")
            self.storage.update_ref(repo_type, repo_id, "tags", tag, name, create=True)
        else:
            self.storage.update_ref(repo_type, repo_id, "tags", name, None, create=False)
        self._send_json({})

    # -- LFS -------------------------------------------------------------------------------------------------------

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        self._require_auth()
        body = self._json_body()
        root, _ = self.storage.read_meta(repo_type, repo_id)
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported")

        def href(action: str) -> dict[str, Any]:
            return {"href": f"{self.hub.endpoint}/{LFS_PREFIX}/{action}/{repo_type}s/{repo_id}", "header": {}}

        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.fullmatch(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "Invalid oid or size"}
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0, "error": error})
                continue
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.storage.has_blob(root, oid, size):
                upload = href("upload")
                item["actions"] = {"upload": {**upload, "href": f"{upload['href']}/{oid}"}, "verify": href("verify")}
            objects.append(item)
        payload = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, payload, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, repo_type: str, repo_id: str, oid: str) -> None:
        if not repo_type or not _SHA256_RE.fullmatch(oid):
            raise HubError(400, "Invalid LFS upload URL")
        root, _ = self.storage.read_meta(repo_type, repo_id)
        self.storage.store_stream(root, self._iter_body(), oid)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        oid, size = str(body.get("oid")), body.get("size")
        if not repo_type or not _SHA256_RE.fullmatch(oid) or not isinstance(size, int):
            raise HubError(400, "Invalid LFS verify request")
        root, _ = self.storage.read_meta(repo_type, repo_id)
        if not self.storage.has_blob(root, oid, size):
            raise HubError(404, f"LFS object {oid} ({size} bytes) not found")
        self._send_json({"message": "Object verified"})

    # -- downloads -------------------------------------------------------------------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        root, commit_id, files = self.storage.snapshot(repo_type, repo_id, revision)
        entry = files.get(path)
        if entry is None:
            raise _entry_not_found(path, commit_id)
        name = path.rsplit("/", 1)[-1]
        ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
        headers = {
            "X-Repo-Commit": commit_id,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";",
            "ETag": f'"{entry["oid"]}"',
        }
        if entry["lfs"]:
            headers["X-Linked-Etag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Size"] = str(entry["size"])
            if self.hub.lfs_redirect:
                cdn_path = f"/{CDN_PREFIX}/{repo_type}s/{repo_id}/{entry['sha256']}"
                self._send(302, b"", {**headers, "Location": self.hub.cdn_endpoint + cdn_path})
                return
            headers["ETag"] = f'"{entry["sha256"]}"'
        if self.command == "HEAD":  # metadata comes from the commit, the blob is not read
            self._send(200, headers={**headers, "Content-Type": "application/octet-stream"}, length=entry["size"])
            return
        self._send_blob(self.storage.blob_file(root, entry["sha256"]), entry["sha256"], headers)

    def _cdn(self, repo_type: str, repo_id: str, sha256: str) -> None:
        if not repo_type or not _SHA256_RE.fullmatch(sha256):
            raise HubError(404, "Not found")
        root = self.storage.repo_root(repo_type, repo_id)
        self._send_blob(self.storage.blob_file(root, sha256), sha256, {"ETag": f'"{sha256}"'})

    def _send_blob(self, blob: Path, sha256: str, headers: dict[str, str]) -> None:
        """Serve a stored blob, honouring a single ``Range``; refuse blobs that are missing or corrupted."""
        if not blob.is_file():
            raise HubError(404, f"The content of this file is missing from the storage ({sha256})", "EntryNotFound")
        if self.command == "GET" and self.hub.verify_blobs and _sha256_file(blob) != sha256:
            raise HubError(500, f"Stored content does not match its hash {sha256}", "BlobCorrupted")
        size = blob.stat().st_size
        headers = {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        status, start, end = 200, 0, size - 1
        byte_range = _parse_range(self.headers.get("Range"), size)
        if byte_range is not None:
            status, (start, end) = 206, byte_range
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self._send(status, headers=headers, length=length)
        if self.command == "HEAD":
            return
        with blob.open("rb") as file:
            file.seek(start)
            while length > 0 and (chunk := file.read(min(length, _COPY_CHUNK))):
                self.wfile.write(chunk)
                length -= len(chunk)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) of a single-range ``Range`` header; None to serve everything; HubError 416 if unsatisfiable."""
    match = _RANGE_RE.fullmatch(header or "")
    if match is None or match.groups() == ("", ""):
        return None  # absent, malformed or multi-range: serve the whole file (allowed by RFC 9110)
    first, last = match.groups()
    unsatisfiable = HubError(416, f"Range not satisfiable: {header}", headers={"Content-Range": f"bytes */{size}"})
    if not first:  # suffix range: the last N bytes
        if int(last) == 0 or size == 0:
            raise unsatisfiable
        return max(size - int(last), 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise unsatisfiable
    return start, end


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


class LoopbackHub:
    """A Hugging Face Hub served from ``data_dir`` on 127.0.0.1 by a background thread.

    Args:
        data_dir: where repos are stored; a temporary directory (deleted by ``stop()``) if None.
        port: 0 picks a free port.
        token: if set, writes must send exactly this bearer token; otherwise any bearer token is accepted.
        lfs_threshold: files larger than this (bytes) must go through LFS.
        lfs_redirect: answer ``/resolve`` of LFS files with a 302 to ``cdn_endpoint``, like the Hub.
        verify_blobs: refuse (500) to serve a blob whose content no longer matches its sha256.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int = 0,
        token: str | None = None,
        lfs_threshold: int = LFS_THRESHOLD,
        lfs_redirect: bool = True,
        verify_blobs: bool = True,
    ):
        self._owns_data_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="loopback-hub-") if data_dir is None else data_dir)
        self.storage = _Storage(self.data_dir)
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.lfs_redirect = lfs_redirect
        self.verify_blobs = verify_blobs
        self.tree_page_size = 1000  # entries per /tree page (the Hub uses 1000, 50 with expand=True)
        self.commits_page_size = 50  # entries per /commits page
        self.requests: list[LoggedRequest] = []
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> "LoopbackHub":
        """Bind the socket and serve in a daemon thread; return self."""
        if self._server is not None:
            raise RuntimeError("LoopbackHub is already running")
        self._server = _Server(("127.0.0.1", self._port), self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and remove the data dir if it is a temporary one."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._server.connections_lock:
                for connection in list(self._server.connections):
                    try:
                        connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LoopbackHub is not running")
        return self._port

    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:45678``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_endpoint(self) -> str:
        """Same server under another origin, standing in for the Hub's CDN for LFS downloads."""
        return f"http://localhost:{self.port}"

    def clear_requests(self) -> None:
        self.requests.clear()

    # -- test helpers ----------------------------------------------------------------------------------------------

    def blob_path(self, repo_id: str, path: str, *, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> Path:
        """Where the content of ``path`` at ``revision`` is stored (raises FileNotFoundError if unknown)."""
        try:
            root, _, files = self.storage.snapshot(repo_type, repo_id, revision)
        except HubError as error:
            raise FileNotFoundError(error.message) from None
        if path not in files:
            raise FileNotFoundError(f"{path} not found in {repo_type} {repo_id} at {revision}")
        return self.storage.blob_file(root, files[path]["sha256"])

    def corrupt_file(
        self,
        repo_id: str,
        path: str,
        *,
        revision: str = DEFAULT_BRANCH,
        repo_type: str = "model",
        data: bytes | None = None,
    ) -> Path:
        """Overwrite the stored content of ``path`` with ``data`` (default: first byte flipped, same size).

        Commit metadata (ETag, size) is left untouched, so the stored bytes no longer match it. Returns the blob path.
        """
        blob = self.blob_path(repo_id, path, revision=revision, repo_type=repo_type)
        if data is None:
            original = blob.read_bytes()
            data = bytes([original[0] ^ 0xFF]) + original[1:] if original else b"\0"
        self.storage.atomic_write(blob, data)
        return blob

    def delete_file(self, repo_id: str, path: str, *, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> Path:
        """Delete the stored content of ``path`` (metadata stays: listings still show it). Returns the blob path."""
        blob = self.blob_path(repo_id, path, revision=revision, repo_type=repo_type)
        blob.unlink()
        return blob
