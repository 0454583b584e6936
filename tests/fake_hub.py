"""A local, in-memory stand-in for the Hugging Face Hub that the real ``huggingface_hub`` client talks to.

It serves exactly the endpoints huggingface_hub 2.4 calls for ``snapshot_download``, ``hf_hub_download``,
``create_repo``, ``create_branch`` and ``upload_folder``/``create_commit`` (every file is uploaded as a
"regular" base64 blob, so no LFS or Xet storage is involved), records every request, and can be told to
fail the next N requests to a path. Point the client at it with ``HF_ENDPOINT`` (see tests/test_hub.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["Commit", "FakeHub", "Repo", "Request"]

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_ROUTES = [  # (method, pattern, handler name); the first match wins
    ("POST", r"/api/repos/create", "_create_repo"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", "_model_info"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "_tree"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "_preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "_commit"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "_create_branch"),
    ("GET", rf"/api/models/{_REPO}", "_model_info"),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
]
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content; the Hub uses it as ETag and ``oid`` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    commits: dict[str, Commit] = field(default_factory=dict)
    #: branch name -> commit sha
    refs: dict[str, str] = field(default_factory=dict)
    private: bool = False


@dataclass
class Request:
    method: str
    path: str
    status: int
    query: dict[str, list[str]]
    authorization: str | None


class _HubError(Exception):
    """An error answer: status, the ``X-Error-Code`` the client dispatches on, and a message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class FakeHub:
    """Threaded HTTP server on 127.0.0.1 (a free port) holding model repos in memory.

    ``with FakeHub() as hub:`` starts and stops it; ``hub.endpoint`` is the value for ``HF_ENDPOINT``.
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        #: requests no route matched: a client feature this fake does not serve yet
        self.unhandled: list[Request] = []
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the FakeHub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ state, for tests
    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """An empty repo whose ``main`` holds one commit with ``.gitattributes``, as on the Hub."""
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists already")
            repo = self.repos[repo_id] = Repo(private=private)
            self._add_commit(repo, "main", {".gitattributes": _GITATTRIBUTES}, [], "initial commit")
            return repo

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "upload",
               delete: tuple[str, ...] = ()) -> str:
        """Add a commit on ``branch`` (creating the repo if needed); returns its 40-hex sha."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            return self._add_commit(repo, branch, files, list(delete), message)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at a branch or commit sha."""
        with self._lock:
            return dict(self._resolve_commit(repo_id, revision).files)

    def fail_next(self, path: str, times: int = 1, status: int = 503, method: str | None = None) -> None:
        """Answer the next ``times`` requests to the exact ``path`` (any method unless given) with ``status``."""
        with self._lock:
            self._faults.append({"path": path, "times": times, "status": status, "method": method})

    def count(self, method: str, path: str) -> int:
        """How many ``method`` requests were made to the exact ``path``."""
        with self._lock:
            return sum(r.method == method and r.path == path for r in self.requests)

    # ------------------------------------------------------------------ internals
    def _add_commit(self, repo: Repo, branch: str, files: dict[str, bytes], delete: list[str], message: str) -> str:
        parent = repo.refs.get(branch)
        tree = dict(repo.commits[parent].files) if parent else {}
        for path in delete:
            tree = {p: d for p, d in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        tree.update(files)
        digest = hashlib.sha1(f"{parent}\n{message}\n{len(repo.commits)}\n".encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{git_blob_id(tree[path])}\n".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(sha, tree, message, parent)
        repo.refs[branch] = sha
        return sha

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve_commit(self, repo_id: str, revision: str) -> Commit:
        repo = self._repo(repo_id)
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _take_fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault["path"] == path and fault["method"] in (None, method) and fault["times"] > 0:
                    fault["times"] -= 1
                    return fault["status"]
        return None

    # ------------------------------------------------------------------ endpoints
    # Each returns (status, headers, body); body is bytes or JSON-serializable.
    def _create_repo(self, payload: dict[str, Any], **_: Any) -> tuple[int, dict[str, str], Any]:
        if payload.get("type", "model") != "model":
            raise _HubError(400, f"this fake Hub holds model repos only, not {payload['type']!r}")
        repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
        if repo_id in self.repos:
            raise _HubError(409, f"You already created this model repo: {repo_id}")
        self.create_repo(repo_id, private=payload.get("visibility", "public") != "public")
        return 200, {}, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def _validate_yaml(self, payload: dict[str, Any], **_: Any) -> tuple[int, dict[str, str], Any]:
        """Only checks that the front matter is a YAML mapping; the real Hub also checks its schema."""
        match = re.match(r"^---\n(.*?)\n---\n", payload.get("content", ""), re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return 400, {}, {"errors": [{"message": f"invalid YAML: {err}"}]}
        if not isinstance(meta, dict):
            return 400, {}, {"errors": [{"message": "metadata must be a YAML mapping"}]}
        return 200, {}, {"errors": [], "warnings": []}

    def _model_info(self, repo: str, rev: str = "main", **_: Any) -> tuple[int, dict[str, str], Any]:
        commit = self._resolve_commit(repo, rev)
        return 200, {}, {"id": repo, "modelId": repo, "sha": commit.sha, "private": self.repos[repo].private,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": []}

    def _tree(self, repo: str, rev: str, query: dict[str, list[str]], path: str | None = None,
              **_: Any) -> tuple[int, dict[str, str], Any]:
        commit = self._resolve_commit(repo, rev)
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # folders on the way to the file
                folder = prefix + "/".join(parts[:i])
                entries.setdefault(folder, {"type": "directory", "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0})
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, "oid": git_blob_id(data), "size": len(data)}
        if path and not entries:
            raise _HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        return 200, {}, list(entries.values())

    def _preupload(self, repo: str, rev: str, payload: dict[str, Any], **_: Any) -> tuple[int, dict[str, str], Any]:
        commit = self._resolve_commit(repo, unquote(rev))
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_id(commit.files[f["path"]]) if f["path"] in commit.files else None}
                 for f in payload["files"]]
        return 200, {}, {"files": files, "commitOid": commit.sha}

    def _commit(self, repo: str, rev: str, body: bytes, query: dict[str, list[str]],
                **_: Any) -> tuple[int, dict[str, str], Any]:
        branch = unquote(rev)
        if query.get("create_pr"):
            raise _HubError(400, "this fake Hub does not open pull requests")
        head = self._resolve_commit(repo, branch).sha
        if branch not in self.repos[repo].refs:
            raise _HubError(400, f"commits go to a branch, not to {branch!r}")
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        delete: list[str] = []
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                delete.append(value["path"])
            else:
                raise _HubError(400, f"this fake Hub only takes regular files and deletions, not {key!r}")
        if header.get("parentCommit") not in (None, head):
            raise _HubError(412, f"parent commit {header['parentCommit']} is not the head of {branch} ({head})")
        sha = self._add_commit(self.repos[repo], branch, files, delete, header.get("summary", ""))
        return 200, {}, {"commitUrl": f"{self.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "success": True}

    def _create_branch(self, repo: str, branch: str, payload: dict[str, Any],
                       **_: Any) -> tuple[int, dict[str, str], Any]:
        branch = unquote(branch)
        refs = self._repo(repo).refs
        if branch in refs:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        refs[branch] = self._resolve_commit(repo, payload.get("startingPoint") or "main").sha
        return 200, {}, {}

    def _resolve(self, method: str, repo: str, rev: str, path: str, headers: Any,
                 **_: Any) -> tuple[int, dict[str, str], Any]:
        commit = self._resolve_commit(repo, unquote(rev))
        path = unquote(path)
        if path not in commit.files:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        out = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("Range", "") or "")
        if match and method == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            out["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data, status = data[start:end], 206
        return status, out, data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
        """Silent: requests are recorded in ``FakeHub.requests`` instead."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.fake._lock:
            status, headers, content = self._answer(method, url.path, query, body)
            request = Request(method, url.path, status, query, self.headers.get("Authorization"))
            self.fake.requests.append(request)
            if status == 404 and "X-Error-Message" not in headers:
                self.fake.unhandled.append(request)
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        if not isinstance(content, bytes):
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _answer(self, method: str, path: str, query: dict[str, list[str]],
                body: bytes) -> tuple[int, dict[str, str], Any]:
        fault = self.fake._take_fault(method, path)
        if fault is not None:
            return fault, {"X-Error-Message": "injected fault"}, {"error": f"injected fault {fault}"}
        for route_method, pattern, name in _ROUTES:
            match = re.fullmatch(pattern, path)
            if route_method != method or match is None:
                continue
            kwargs = {k: v for k, v in match.groupdict().items() if v is not None}
            try:
                is_json = self.headers.get("Content-Type", "").startswith("application/json")
                payload = json.loads(body) if body and is_json else {}
                return getattr(self.fake, name)(method=method, payload=payload, body=body, query=query,
                                                headers=self.headers, **kwargs)
            except _HubError as err:
                headers = {"X-Error-Message": str(err), **err.headers}
                if err.code:
                    headers["X-Error-Code"] = err.code
                return err.status, headers, {"error": str(err)}
        return 404, {}, {"error": f"the fake Hub does not serve {method} {path}"}
