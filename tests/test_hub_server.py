"""The loopback Hub (tests/hub_server.py) driven by the real huggingface_hub client and by transformers."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import get_session

if TYPE_CHECKING:
    from hub_server import LoopbackHub


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_folder(cache_dir: Path, repo_id: str, repo_type: str = "model") -> Path:
    return cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"


def leftover_files(cache_dir: Path) -> list[str]:
    """Files a failed download must not leave behind: blobs, snapshot entries and temporary downloads."""
    return sorted(
        str(path.relative_to(cache_dir))
        for path in cache_dir.rglob("*")
        if (path.is_file() or path.is_symlink())
        and ({"blobs", "snapshots"} & set(path.parts) or path.name.endswith(".incomplete"))
    )


def new_requests(hub: "LoopbackHub", start: int) -> list[tuple[str, str, int]]:
    """(method, path without query, status) of the requests served since ``start``."""
    return [(r.method, r.path.split("?")[0], r.status) for r in hub.requests[start:]]


@pytest.fixture
def api() -> HfApi:
    return HfApi()


@pytest.fixture
def repo(api: HfApi, hub_repo_id: str) -> str:
    api.create_repo(hub_repo_id)
    return hub_repo_id


def test_create_and_delete_repos(api: HfApi, hub_server: "LoopbackHub", hub_repo_id: str) -> None:
    url = api.create_repo(hub_repo_id)
    assert (url.repo_id, url.repo_type) == (hub_repo_id, "model")
    assert url == f"{hub_server.endpoint}/{hub_repo_id}"
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(hub_repo_id)
    assert error.value.response.status_code == 409
    assert api.create_repo(hub_repo_id, exist_ok=True).repo_id == hub_repo_id

    dataset_url = api.create_repo(hub_repo_id, repo_type="dataset")
    assert dataset_url == f"{hub_server.endpoint}/datasets/{hub_repo_id}"
    assert api.repo_exists(hub_repo_id) and api.repo_exists(hub_repo_id, repo_type="dataset")
    assert not api.repo_exists(hub_repo_id, repo_type="space")

    info = api.model_info(hub_repo_id, files_metadata=True)
    assert re.fullmatch(r"[0-9a-f]{40}", info.sha or "")
    assert [s.rfilename for s in info.siblings or []] == [".gitattributes"]  # the Hub's "initial commit"
    attributes = (info.siblings or [])[0]
    assert attributes.lfs is None and attributes.size and attributes.blob_id
    assert api.list_repo_commits(hub_repo_id)[0].title == "initial commit"
    assert api.whoami()["name"] == "loopback-user"

    with pytest.raises(HfHubHTTPError) as error:  # writes need the configured token
        HfApi(token="hf_wrong").create_repo(f"{hub_repo_id}-other")
    assert error.value.response.status_code == 401

    api.delete_repo(hub_repo_id, repo_type="dataset")
    assert not api.repo_exists(hub_repo_id, repo_type="dataset")
    assert api.repo_exists(hub_repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(hub_repo_id, repo_type="dataset")
    api.delete_repo(hub_repo_id, repo_type="dataset", missing_ok=True)
    api.delete_repo(hub_repo_id)
    assert not api.repo_exists(hub_repo_id)


def test_upload_file_folder_and_commit_operations(api: HfApi, repo: str, tmp_path: Path) -> None:
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="notes/a.txt", repo_id=repo)
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    (folder / "b.txt").write_text("b")
    (folder / "nested" / "c.json").write_text("{}")
    (folder / "debug.log").write_text("ignored")
    (folder / ".gitignore").write_text("*.log\n")  # preupload answers shouldIgnore for debug.log
    api.upload_folder(folder_path=folder, repo_id=repo, commit_message="add folder")
    assert api.list_repo_files(repo) == [".gitattributes", ".gitignore", "b.txt", "nested/c.json", "notes/a.txt"]

    operations = [
        CommitOperationAdd("notes/a.txt", b"v2"),
        CommitOperationAdd("new.txt", b"new"),
        CommitOperationCopy("notes/a.txt", "notes/a_copy.txt"),  # copies the parent revision: "v1"
        CommitOperationDelete("b.txt"),
        CommitOperationDelete("nested/"),
    ]
    commit = api.create_commit(repo, operations=operations, commit_message="several ops", commit_description="why")
    assert api.list_repo_files(repo) == [".gitattributes", ".gitignore", "new.txt", "notes/a.txt", "notes/a_copy.txt"]
    cache = tmp_path / "cache"
    assert Path(hf_hub_download(repo, "notes/a.txt", cache_dir=cache)).read_bytes() == b"v2"
    assert Path(hf_hub_download(repo, "notes/a_copy.txt", cache_dir=cache)).read_bytes() == b"v1"
    last = api.list_repo_commits(repo)[0]
    assert (last.commit_id, last.title, last.message) == (commit.oid, "several ops", "why")

    # Same content again: preupload returns the remote oid, the client skips the no-op commit.
    assert api.upload_file(path_or_fileobj=b"new", path_in_repo="new.txt", repo_id=repo).oid == commit.oid
    history = api.list_repo_commits(repo)
    assert len(history) == 4
    with pytest.raises(EntryNotFoundError, match="doesn't exist"):
        api.delete_file("missing.txt", repo_id=repo)
    with pytest.raises(HfHubHTTPError) as error:  # parentCommit is not the head any more
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, parent_commit=history[1].commit_id)
    assert error.value.response.status_code == 412
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, parent_commit=commit.oid[:7])


def test_large_file_goes_through_lfs(api: HfApi, repo: str, hub_server: "LoopbackHub", tmp_path: Path) -> None:
    data = os.urandom(hub_server.lfs_threshold + 1024 * 1024)  # > 10 MiB: LFS whatever the name
    sha256 = hashlib.sha256(data).hexdigest()
    start = len(hub_server.requests)
    api.upload_file(path_or_fileobj=data, path_in_repo="big.dat", repo_id=repo)
    requests = new_requests(hub_server, start)
    assert ("POST", f"/{repo}.git/info/lfs/objects/batch", 200) in requests
    assert ("PUT", f"/__lfs__/upload/models/{repo}/{sha256}", 200) in requests
    assert ("POST", f"/api/models/{repo}/commit/main", 200) in requests

    (info,) = api.get_paths_info(repo, ["big.dat"])
    assert isinstance(info, RepoFile) and info.lfs is not None
    assert (info.size, info.lfs.sha256, info.lfs.size) == (len(data), sha256, len(data))
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    assert (info.blob_id, info.lfs.pointer_size) == (git_blob_oid(pointer), len(pointer))

    metadata = get_hf_file_metadata(hf_hub_url(repo, "big.dat"))  # HEAD answered by a 302 to the "CDN"
    assert (metadata.etag, metadata.size) == (sha256, len(data))
    assert metadata.location.startswith(f"{hub_server.cdn_endpoint}/__cdn__/")
    path = Path(hf_hub_download(repo, "big.dat", cache_dir=tmp_path))
    assert path.read_bytes() == data and path.resolve().name == sha256

    # Content already stored: the batch answer has no upload action; an LFS copy needs no upload either.
    start = len(hub_server.requests)
    api.upload_file(path_or_fileobj=data, path_in_repo="again.dat", repo_id=repo)
    api.create_commit(repo, operations=[CommitOperationCopy("big.dat", "copies/big.dat")], commit_message="copy")
    assert not [r for r in new_requests(hub_server, start) if r[0] == "PUT"]
    lfs_by_path = {e.path: e.lfs for e in api.list_repo_tree(repo, recursive=True) if isinstance(e, RepoFile)}
    assert lfs_by_path["again.dat"].sha256 == lfs_by_path["copies/big.dat"].sha256 == sha256

    # Small files: LFS when .gitattributes says so (the default one tracks *.safetensors), regular otherwise.
    api.upload_file(path_or_fileobj=b"tiny", path_in_repo="tiny.safetensors", repo_id=repo)
    api.upload_file(path_or_fileobj=b"tiny", path_in_repo="tiny.txt", repo_id=repo)
    infos = {e.path: e for e in api.get_paths_info(repo, ["tiny.safetensors", "tiny.txt"])}
    assert infos["tiny.safetensors"].lfs is not None and infos["tiny.txt"].lfs is None


def test_downloads_into_an_empty_cache(api: HfApi, repo: str, tmp_path: Path) -> None:
    contents = {"config.json": b'{"a": 1}', "notes.txt": b"notes", "sub/weights.safetensors": os.urandom(300)}
    folder = tmp_path / "upload"
    for name, content in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    api.upload_folder(folder_path=folder, repo_id=repo)
    head = api.model_info(repo).sha
    assert head is not None

    cache = tmp_path / "cache"
    path = Path(hf_hub_download(repo, "config.json", cache_dir=cache))
    storage = cache_folder(cache, repo)
    assert path == storage / "snapshots" / head / "config.json"
    assert (storage / "refs" / "main").read_text() == head
    assert path.resolve() == storage / "blobs" / git_blob_oid(contents["config.json"])  # ETag = git blob sha1

    snapshot = Path(snapshot_download(repo, cache_dir=cache))
    assert snapshot == storage / "snapshots" / head
    downloaded = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert downloaded.pop(".gitattributes").startswith(b"*.7z filter=lfs")
    assert downloaded == contents
    verification = api.verify_repo_checksums(repo, cache_dir=cache)  # the client re-hashes every file
    assert (verification.checked_count, verification.mismatches, verification.missing_paths) == (4, [], [])

    local = Path(snapshot_download(repo, local_dir=tmp_path / "local"))
    assert (local / "sub" / "weights.safetensors").read_bytes() == contents["sub/weights.safetensors"]

    api.create_repo(repo, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n", path_in_repo="data/train.csv", repo_id=repo, repo_type="dataset")
    dataset_path = Path(hf_hub_download(repo, "data/train.csv", repo_type="dataset", cache_dir=cache))
    assert dataset_path.read_bytes() == b"a,b\n"
    assert cache_folder(cache, repo, "dataset") in dataset_path.parents


def test_branches_tags_and_revisions(api: HfApi, repo: str, tmp_path: Path) -> None:
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="model.txt", repo_id=repo).oid
    api.create_branch(repo, branch="dev")
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="model.txt", repo_id=repo, revision="dev").oid
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="extra.txt", repo_id=repo, revision="dev")

    def download(revision: str, cache: str = "cache") -> bytes:
        return Path(hf_hub_download(repo, "model.txt", revision=revision, cache_dir=tmp_path / cache)).read_bytes()

    assert [download(rev) for rev in ("main", "dev", first, second)] == [b"v1", b"v2", b"v1", b"v2"]
    assert api.list_repo_files(repo) == [".gitattributes", "model.txt"]
    assert api.list_repo_files(repo, revision="dev") == [".gitattributes", "extra.txt", "model.txt"]

    api.create_tag(repo, tag="v1.0", revision=first, tag_message="first release")
    assert download("v1.0") == b"v1"
    api.create_branch(repo, branch="feature/from-tag", revision="v1.0")
    refs = api.list_repo_refs(repo)
    branches = {ref.name: ref.target_commit for ref in refs.branches}
    dev_head = api.model_info(repo, revision="dev").sha
    assert branches == {"main": first, "dev": dev_head, "feature/from-tag": first}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1.0", "refs/tags/v1.0", first)]
    assert download("feature/from-tag") == b"v1"

    for create in (lambda: api.create_branch(repo, branch="dev"), lambda: api.create_tag(repo, tag="v1.0")):
        with pytest.raises(HfHubHTTPError) as error:
            create()
        assert error.value.response.status_code == 409
    api.create_branch(repo, branch="dev", exist_ok=True)
    with pytest.raises(BadRequestError):  # commits go to branches only
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, revision="v1.0")

    api.delete_tag(repo, tag="v1.0")
    api.delete_branch(repo, branch="dev")
    with pytest.raises(RevisionNotFoundError):
        download("dev", cache="fresh")
    with pytest.raises(RevisionNotFoundError):
        api.delete_branch(repo, branch="dev")
    assert download(second, cache="fresh") == b"v2"  # commits outlive their branch
    assert {ref.name for ref in api.list_repo_refs(repo).branches} == {"main", "feature/from-tag"}


def test_listing_tree_paths_info_and_commits(
    api: HfApi, repo: str, hub_server: "LoopbackHub", tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "upload"
    (folder / "dir1" / "dir2").mkdir(parents=True)
    for name in ("a.txt", "dir1/b.txt", "dir1/dir2/c.txt"):
        (folder / name).write_text(name)
    api.upload_folder(folder_path=folder, repo_id=repo, commit_message="first")
    api.upload_file(path_or_fileobj=b"changed", path_in_repo="dir1/b.txt", repo_id=repo, commit_message="second")

    top = {entry.path: type(entry) for entry in api.list_repo_tree(repo)}
    assert top == {".gitattributes": RepoFile, "a.txt": RepoFile, "dir1": RepoFolder}
    recursive = [entry.path for entry in api.list_repo_tree(repo, recursive=True)]
    assert recursive == [".gitattributes", "a.txt", "dir1", "dir1/b.txt", "dir1/dir2", "dir1/dir2/c.txt"]
    assert [entry.path for entry in api.list_repo_tree(repo, path_in_repo="dir1")] == ["dir1/b.txt", "dir1/dir2"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo, path_in_repo="missing"))

    expanded = {entry.path: entry.last_commit for entry in api.list_repo_tree(repo, expand=True)}
    titles = {path: last_commit.title for path, last_commit in expanded.items() if last_commit}
    assert titles == {".gitattributes": "initial commit", "a.txt": "first", "dir1": "second"}

    infos = api.get_paths_info(repo, ["a.txt", "dir1", "missing.txt"], expand=True)
    assert [(type(i), i.path) for i in infos] == [(RepoFile, "a.txt"), (RepoFolder, "dir1")]
    assert isinstance(infos[0], RepoFile) and infos[0].blob_id == git_blob_oid(b"a.txt") and infos[0].size == 5
    assert infos[1].last_commit is not None and infos[1].last_commit.title == "second"

    monkeypatch.setattr(hub_server, "tree_page_size", 2)
    monkeypatch.setattr(hub_server, "commits_page_size", 1)
    start = len(hub_server.requests)
    assert [entry.path for entry in api.list_repo_tree(repo, recursive=True)] == recursive
    tree_calls = [r for r in hub_server.requests[start:] if "/tree/" in r.path]
    assert len(tree_calls) == 3 and "cursor=" in tree_calls[-1].path  # pages followed through the Link header
    commits = api.list_repo_commits(repo, formatted=True)
    assert [c.title for c in commits] == ["second", "first", "initial commit"]
    assert commits[0].authors == ["loopback-user"] and commits[0].formatted_title == "second"
    assert commits[0].created_at >= commits[1].created_at


def test_file_exists_and_error_mapping(api: HfApi, repo: str, hub_server: "LoopbackHub", tmp_path: Path) -> None:
    missing_repo = f"{repo}-missing"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(missing_repo)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(missing_repo, "config.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, ".gitattributes", revision="nope", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo, revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo, "missing.txt", cache_dir=tmp_path)
    head = api.model_info(repo).sha
    assert (cache_folder(tmp_path, repo) / ".no_exist" / str(head) / "missing.txt").is_file()  # from X-Repo-Commit

    assert api.file_exists(repo, ".gitattributes")
    assert not api.file_exists(repo, "missing.txt")
    assert not api.file_exists(repo, ".gitattributes", revision="nope")
    assert not api.file_exists(missing_repo, ".gitattributes")

    session = get_session()
    cases = [
        ("HEAD", hf_hub_url(repo, "missing.txt"), "EntryNotFound"),
        ("GET", hf_hub_url(repo, "x", revision="nope"), "RevisionNotFound"),
        ("GET", f"{hub_server.endpoint}/api/models/{missing_repo}", "RepoNotFound"),
        ("GET", f"{hub_server.endpoint}/api/datasets/{repo}", "RepoNotFound"),
    ]
    for method, url, code in cases:
        response = session.request(method, url)
        assert (response.status_code, response.headers["X-Error-Code"]) == (404, code)
        if method == "GET":
            assert "error" in response.json()
    assert session.head(hf_hub_url(repo, "missing.txt")).headers["X-Repo-Commit"] == head


def test_range_requests(api: HfApi, repo: str, hub_server: "LoopbackHub") -> None:
    data = bytes(range(256)) * 4
    api.upload_file(path_or_fileobj=data, path_in_repo="range.txt", repo_id=repo)
    api.upload_file(path_or_fileobj=data, path_in_repo="range.bin", repo_id=repo)  # LFS: redirected to the "CDN"
    session = get_session()
    for name in ("range.txt", "range.bin"):
        url = hf_hub_url(repo, name)
        for header, expected, content_range in [
            ("bytes=10-19", data[10:20], "bytes 10-19/1024"),
            ("bytes=-5", data[-5:], "bytes 1019-1023/1024"),
            ("bytes=1000-", data[1000:], "bytes 1000-1023/1024"),
            ("bytes=1000-5000", data[1000:], "bytes 1000-1023/1024"),
        ]:
            response = session.get(url, headers={"Range": header})
            assert (response.status_code, response.content) == (206, expected), (name, header)
            assert response.headers["Content-Range"] == content_range
        response = session.get(url, headers={"Range": "bytes=5000-"})
        assert (response.status_code, response.headers["Content-Range"]) == (416, "bytes */1024")
        assert session.get(url).content == data

        buffer = io.BytesIO()  # the client's own resume logic sends "Range: bytes=100-"
        http_get(url, buffer, resume_size=100, expected_size=len(data))
        assert buffer.getvalue() == data[100:]


def test_offline_mode_uses_the_warm_cache(api: HfApi, repo: str, hub_server: "LoopbackHub") -> None:
    api.upload_file(path_or_fileobj=b"cached", path_in_repo="cached.txt", repo_id=repo)
    snapshot = snapshot_download(repo)  # default cache, under the session HF_HOME
    api.upload_file(path_or_fileobj=b"later", path_in_repo="later.txt", repo_id=repo)  # never downloaded

    # huggingface_hub reads HF_HUB_OFFLINE at import: run the offline part in a fresh interpreter.
    script = textwrap.dedent(
        """
        import json, sys
        from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
        repo = sys.argv[1]
        result = {"offline": constants.HF_HUB_OFFLINE}
        result["cached"] = open(hf_hub_download(repo, "cached.txt")).read()
        result["snapshot"] = snapshot_download(repo)
        try:
            hf_hub_download(repo, "later.txt")
        except LocalEntryNotFoundError as error:
            result["later"] = type(error).__name__
        try:
            HfApi().model_info(repo)
        except OfflineModeIsEnabled as error:
            result["api"] = type(error).__name__
        print(json.dumps(result))
        """
    )
    start = len(hub_server.requests)
    process = subprocess.run(
        [sys.executable, "-c", script, repo],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result == {
        "offline": True,
        "cached": "cached",
        "snapshot": snapshot,
        "later": "LocalEntryNotFoundError",
        "api": "OfflineModeIsEnabled",
    }
    assert hub_server.requests[start:] == []  # not a single request reached the Hub


@pytest.mark.slow  # the first BertModel import and push: ~9 s on 2 cores
def test_transformers_bert_round_trip(api: HfApi, hub_repo_id: str, tmp_path: Path) -> None:
    import torch  # core dependencies of dfm_hf: never skipped
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()
    model.push_to_hub(hub_repo_id)  # create_repo + model card + preupload + LFS batch/PUT + commit

    files = api.list_repo_files(hub_repo_id)
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    infos = {entry.path: entry for entry in api.get_paths_info(hub_repo_id, ["config.json", "model.safetensors"])}
    assert infos["model.safetensors"].lfs is not None and infos["config.json"].lfs is None

    loaded = transformers.BertModel.from_pretrained(hub_repo_id, cache_dir=tmp_path)
    assert loaded.config.hidden_size == 32 and loaded.config.num_hidden_layers == 2
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_standalone_hub_without_redirect_keeps_its_data(hub_server: "LoopbackHub", tmp_path: Path) -> None:
    data, repo_id = os.urandom(1000), "dfm-test/standalone"
    sha256 = hashlib.sha256(data).hexdigest()
    with type(hub_server)(tmp_path / "hub", lfs_redirect=False) as hub:  # LFS files served directly, no 302
        assert hub.endpoint != hub_server.endpoint
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=data, path_in_repo="w.bin", repo_id=repo_id)
        url = hf_hub_url(repo_id, "w.bin", endpoint=hub.endpoint)
        metadata = get_hf_file_metadata(url)
        assert (metadata.etag, metadata.size, metadata.location) == (sha256, len(data), url)
        path = hf_hub_download(repo_id, "w.bin", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == data
        head = api.model_info(repo_id).sha
    with type(hub_server)(tmp_path / "hub") as hub:  # a new server on the same data dir sees the same repo
        api = HfApi(endpoint=hub.endpoint)
        assert api.model_info(repo_id).sha == head
        assert api.list_repo_files(repo_id) == [".gitattributes", "w.bin"]
    assert (tmp_path / "hub" / "repos" / "models" / repo_id / "blobs" / sha256).read_bytes() == data


def test_corrupted_or_missing_blobs(
    api: HfApi, repo: str, hub_server: "LoopbackHub", tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    regular, lfs = b"regular content " * 64, os.urandom(2048)
    api.upload_file(path_or_fileobj=regular, path_in_repo="r.txt", repo_id=repo)
    api.upload_file(path_or_fileobj=lfs, path_in_repo="w.bin", repo_id=repo)
    hub_server.corrupt_file(repo, "r.txt")
    blob = hub_server.corrupt_file(repo, "w.bin")
    assert blob.stat().st_size == len(lfs) and blob.read_bytes() != lfs

    # Default: the hub checks the stored bytes against their hash and answers 500 instead of serving them.
    cache = tmp_path / "verified"
    for name in ("r.txt", "w.bin"):
        with pytest.raises(HfHubHTTPError) as error:
            hf_hub_download(repo, name, cache_dir=cache)
        assert (error.value.response.status_code, error.value.response.headers["X-Error-Code"]) == (
            500,
            "BlobCorrupted",
        )
    assert leftover_files(cache) == []

    # A dumb server serves whatever it has. huggingface_hub only checks the size, not the hash, while downloading:
    monkeypatch.setattr(hub_server, "verify_blobs", False)
    cache = tmp_path / "unverified"
    assert Path(hf_hub_download(repo, "r.txt", cache_dir=cache)).read_bytes() != regular  # silently wrong...
    (mismatch,) = api.verify_repo_checksums(repo, cache_dir=cache).mismatches  # ...until verified explicitly
    assert (mismatch["path"], mismatch["expected"]) == ("r.txt", git_blob_oid(regular))
    hub_server.corrupt_file(repo, "w.bin", data=lfs[:-10])  # a size mismatch is caught and the download removed
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(repo, "w.bin", cache_dir=cache)
    assert leftover_files(cache) == [f"models--{repo.replace('/', '--')}/blobs/{git_blob_oid(regular)}"] + [
        f"models--{repo.replace('/', '--')}/snapshots/{api.model_info(repo).sha}/r.txt"
    ]

    hub_server.delete_file(repo, "r.txt")
    cache = tmp_path / "deleted"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo, "r.txt", cache_dir=cache)
    assert leftover_files(cache) == []
    assert api.file_exists(repo, "r.txt")  # the metadata is still there, only the content is gone
