"""A loopback Hub for the publish tests: the few endpoints huggingface_hub's real client calls to create
a repo, commit regular (non-LFS, non-xet) files and download them back. Repos live in a folder (one
subfolder per commit); nothing here is a general Hub. Started and stopped by the test, 127.0.0.1 only.

Endpoints (as the client, huggingface_hub 1.x/2.x, calls them with HF_HUB_DISABLE_XET=1):
    POST /api/repos/create                                  create_repo (409 when it exists)
    POST /api/validate-yaml                                 ModelCard.validate: the card's metadata parses
    GET  /api/models/{repo}[/revision/{rev}]                model_info / repo_info
    POST /api/models/{repo}/preupload/{rev}                 every file "regular": no LFS or xet upload
    POST /api/models/{repo}/commit/{rev}                    NDJSON: a header, then base64 "file" entries
    HEAD/GET /{repo}/resolve/{rev}/{path}                   with X-Repo-Commit, ETag, Content-Length
Missing repos and files answer 404 with the `X-Error-Code` the client maps to its own errors
(RepositoryNotFound, EntryNotFound, RevisionNotFound): transformers probes optional files this way.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["LoopbackHub"]

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "info"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub:
    """`with LoopbackHub(tmp_path) as hub:` serves on `hub.endpoint` (http://127.0.0.1:<free port>)
    until the block ends. `hub.requests` lists `(method, path)` of every request served."""

    def __init__(self, root, request_timeout: float = 30.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            # A client that stalls mid-request is dropped after this many seconds, so no handler
            # thread outlives the test by more than that.
            timeout = request_timeout
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

            def do_POST(self):
                hub._dispatch(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # storage: root/<owner>/<name>/refs.json ({"main": sha}) and root/<owner>/<name>/commits/<sha>/<path>

    def _repo_dir(self, repo: str) -> Path:
        return self.root / repo

    def _refs(self, repo: str) -> dict | None:
        refs = self._repo_dir(repo) / "refs.json"
        return json.loads(refs.read_text()) if refs.exists() else None

    def _files(self, repo: str, sha: str | None) -> dict[str, Path]:
        if sha is None:
            return {}
        folder = self._repo_dir(repo) / "commits" / sha
        return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}

    def _resolve_rev(self, repo: str, rev: str | None) -> str | None:
        refs = self._refs(repo) or {}
        rev = rev or "main"
        if rev in refs:
            return refs[rev]
        return rev if (self._repo_dir(repo) / "commits" / rev).is_dir() else None

    def _dispatch(self, handler, method):
        path = unquote(urlsplit(handler.path).path)
        with self._lock:
            self.requests.append((method, path))
        body = b""
        if method == "POST":
            body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if route_method == method and match:
                with self._lock:
                    status, headers, payload = getattr(self, "_" + name)(body=body, **match.groupdict())
                break
        else:
            status, headers, payload = 404, {}, {"error": f"loopback hub: no route for {method} {path}"}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(data))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data)

    def _missing_repo(self, repo):
        return 404, {"X-Error-Code": "RepositoryNotFound"}, {"error": f"Repository {repo} not found"}

    def _create_repo(self, body, **_):
        request = json.loads(body or b"{}")
        repo = f"{request.get('organization') or 'user'}/{request['name']}"
        url = {"url": f"{self.endpoint}/{repo}", "name": repo}
        if self._refs(repo) is not None:
            return 409, {}, {"error": "You already created this model repo", **url}
        (self._repo_dir(repo) / "commits").mkdir(parents=True)
        (self._repo_dir(repo) / "refs.json").write_text(json.dumps({"main": None}))
        return 200, {}, url

    def _validate_yaml(self, body, **_):
        import yaml

        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if match is None or not isinstance(yaml.safe_load(match.group(1)), dict):
            return 400, {"Content-Type": "text/plain"}, b"- Error: the card has no YAML metadata block"
        return 200, {}, {}

    def _info(self, repo, rev=None, body=None):
        if self._refs(repo) is None:
            return self._missing_repo(repo)
        sha = self._resolve_rev(repo, rev)
        siblings = [{"rfilename": name} for name in sorted(self._files(repo, sha))]
        return 200, {}, {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings, "tags": []}

    def _preupload(self, repo, rev, body):
        if self._refs(repo) is None:
            return self._missing_repo(repo)
        files = json.loads(body)["files"]
        # "regular": the content goes inline (base64) in the commit, so no LFS batch or xet upload.
        return 200, {}, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def _commit(self, repo, rev, body):
        refs = self._refs(repo)
        if refs is None:
            return self._missing_repo(repo)
        parent = refs.get(rev)
        files = {name: p.read_bytes() for name, p in self._files(repo, parent).items()}
        summary = ""
        for line in body.splitlines():
            entry = json.loads(line)
            key, value = entry["key"], entry["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                assert value.get("encoding", "base64") == "base64", value.get("encoding")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:  # lfsFile, deletedFolder, ...: this hub told the client every file is regular
                return 400, {}, {"error": f"loopback hub: unsupported commit entry {key!r}"}
        digest = hashlib.sha1(json.dumps([parent, summary, sorted((k, _git_blob_sha(v)) for k, v in files.items())])
                              .encode()).hexdigest()
        folder = self._repo_dir(repo) / "commits" / digest
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        folder.mkdir(parents=True, exist_ok=True)
        refs[rev] = digest
        (self._repo_dir(repo) / "refs.json").write_text(json.dumps(refs))
        return 200, {}, {"commitUrl": f"{self.endpoint}/{repo}/commit/{digest}", "commitOid": digest,
                         "pullRequestUrl": None, "success": True}

    def _resolve(self, repo, rev, path, body=None):
        if self._refs(repo) is None:
            return self._missing_repo(repo)
        sha = self._resolve_rev(repo, rev)
        if sha is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {rev}"}
        file = self._files(repo, sha).get(path)
        if file is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, {"error": f"{path} not found"}
        data = file.read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_sha(data)}"', "Content-Type": "application/octet-stream"}
        return 200, headers, data
