"""A loopback HTTP server that speaks the Hugging Face Hub's protocol, for tests.

It serves in-memory model repos on 127.0.0.1 with the part of the Hub's HTTP API that
huggingface_hub (2.x) uses to download (``HEAD``/``GET /{repo}/resolve/{revision}/{path}``, with
``X-Repo-Commit``, ``ETag``, ``X-Linked-Size`` and ``Range``), to describe a repo
(``/api/models/{repo}[/revision/{revision}]``, ``/api/models/{repo}/tree/{revision}``), and to
publish (``/api/repos/create``, ``/api/whoami-v2``, ``/api/validate-yaml``,
``/api/models/{repo}/preupload/{revision}`` and ``/api/models/{repo}/commit/{revision}``; every
file is committed inline, the Hub's "regular" upload mode). Errors carry the Hub's
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so that
huggingface_hub raises the same exceptions as against the real Hub.

huggingface_hub reads ``HF_ENDPOINT`` when it is imported, so clients run in subprocesses whose
environment `client_env` builds. `run_python` runs a client script. `faults` makes the server misbehave for one file:
``"drop"`` (the connection closes halfway through the body, every time), ``"oversend"`` (the
body is streamed without a length, far past the size the metadata declares) or an int (the size
the metadata declares instead of the real one).
"""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERSEND_BYTES = 64 * 2**20


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """In-memory repos ``{repo_id: {"refs": {branch: commit}, "commits": {commit: {path: bytes}},
    "private": bool}}`` served over HTTP; use as a context manager."""

    def __init__(self, token="hf_loopback_token", user="me"):
        self.token = token
        self.user = user
        self.repos = {}
        self.faults = {}  # {(repo_id, path): "drop" | "oversend" | declared size}
        self.requests = []  # [(method, path)] in arrival order
        self.sent_bytes = {}  # {(repo_id, path): body bytes sent by the last GET}
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    # ------------------------------------------------------------------------ life cycle

    def __enter__(self):
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_env(self, home, backend=None, token=True, **extra):
        """The environment of a client subprocess: this server as HF_ENDPOINT, huggingface_hub's
        and Keras' caches under `home`, this repo's keras_coat on the path, the token in
        HF_TOKEN (unless `token` is False)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=os.path.join(home, "hf"),
            KERAS_HOME=os.path.join(home, "keras"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_XET="1",
            PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")])),
            TF_CPP_MIN_LOG_LEVEL="2",
            NO_PROXY="127.0.0.1",
        )
        if token:
            env["HF_TOKEN"] = self.token
        if backend:
            env["KERAS_BACKEND"] = backend
        env.update(extra)
        return env

    # ------------------------------------------------------------------------- repo state

    def add_repo(self, repo_id, files, private=False):
        """Creates (or replaces) `repo_id` with one commit of `files` ({path: bytes}) on main;
        returns the commit id."""
        with self._lock:
            self.repos[repo_id] = {"refs": {}, "commits": {}, "private": private}
            return self._commit(repo_id, "main", dict(files), "initial commit")

    def commit(self, repo_id, files, branch="main", message="update"):
        """Adds a commit on `branch` whose tree is the branch's plus `files` (bytes, or None to
        delete); returns its id."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo["commits"][repo["refs"][branch]] if branch in repo["refs"] else {}
            tree = dict(parent)
            for path, data in files.items():
                if data is None:
                    tree.pop(path, None)
                else:
                    tree[path] = data
            return self._commit(repo_id, branch, tree, message)

    def _commit(self, repo_id, branch, tree, message):
        repo = self.repos[repo_id]
        digest = hashlib.sha1(repo["refs"].get(branch, "").encode() + message.encode())
        for path in sorted(tree):
            digest.update(path.encode() + b"\0" + git_blob_id(tree[path]).encode())
        commit = digest.hexdigest()
        repo["commits"][commit] = tree
        repo["refs"][branch] = commit
        return commit

    def run_python(self, script, home, backend=None, timeout=600, **env):
        """Runs `script` in a client subprocess (`client_env`) and returns the JSON object its
        last line of output prints; a failing script fails the test with its stderr."""
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
            env=self.client_env(home, backend, **env), timeout=timeout, cwd=REPO_ROOT,
        )
        if result.returncode != 0:
            raise AssertionError(f"client exited with {result.returncode}:\n{result.stderr[-6000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def files(self, repo_id, revision="main"):
        """{path: bytes} of `repo_id` at `revision`."""
        repo = self.repos[repo_id]
        return dict(repo["commits"][repo["refs"].get(revision, revision)])

    def got(self, repo_id, path, method="GET"):
        """How many `method` requests for the file `path` of `repo_id` arrived."""
        return sum(
            1 for m, p in self.requests
            if m == method and p.startswith(f"/{repo_id}/resolve/") and p.endswith(f"/{path}")
        )


class _HubError(Exception):
    def __init__(self, status, code=None, message="", commit=None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None  # set on the subclass HubServer makes

    def log_message(self, *args):  # quiet
        pass

    # ----------------------------------------------------------------------- dispatch

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method):
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        query = urllib.parse.parse_qs(parsed.query)
        body = b""
        if method == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = [p for p in parsed.path.split("/") if p]
        if parts == ["_loopback", "requests"]:  # for client scripts: how many requests so far
            return self._json(200, {"count": len(self.hub.requests)})
        self.hub.requests.append((method, path))
        try:
            if parts[:2] == ["api", "whoami-v2"]:
                return self._json(200, {"type": "user", "name": self._user(required=True)})
            if parts[:2] == ["api", "validate-yaml"]:
                return self._json(200, {"errors": [], "warnings": []})
            if parts[:3] == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._api(method, parts[2:], query, body)
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = f"{parts[0]}/{parts[1]}"
                revision = urllib.parse.unquote(parts[3])
                return self._resolve(method, repo_id, revision, urllib.parse.unquote(
                    "/".join(parts[4:])))
            raise _HubError(404, message=f"no route for {path}")
        except _HubError as e:
            self._error(e)

    # ---------------------------------------------------------------------------- helpers

    def _user(self, required=False):
        header = self.headers.get("Authorization", "")
        if header == f"Bearer {self.hub.token}":
            return self.hub.user
        if required:
            raise _HubError(401, message="Invalid credentials in Authorization header")
        return None

    def _repo(self, repo_id, revision=None):
        """The repo and the commit `revision` names (a branch, or a full or short commit id)."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo["private"] and self._user() is None):
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        if revision is None:
            return repo, None
        if revision in repo["refs"]:
            return repo, repo["refs"][revision]
        matches = [c for c in repo["commits"] if len(revision) >= 7 and c.startswith(revision)]
        if len(matches) == 1:
            return repo, matches[0]
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _json(self, status, data, headers=()):
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _error(self, error):
        headers = [("X-Error-Message", error.message)]
        if error.code:
            headers.append(("X-Error-Code", error.code))
        if error.commit:
            headers.append(("X-Repo-Commit", error.commit))
        self._json(error.status, {"error": error.message}, headers)

    # ------------------------------------------------------------------------ downloads

    def _resolve(self, method, repo_id, revision, path):
        _, commit = self._repo(repo_id, revision)
        tree = self.hub.files(repo_id, commit)
        if path not in tree:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist", commit)
        data = tree[path]
        fault = self.hub.faults.get((repo_id, path))
        declared = fault if isinstance(fault, int) else len(data)
        lfs = not path.endswith((".json", ".md", ".txt", ".gitattributes"))
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
        start = 0
        range_header = self.headers.get("Range", "")
        if method == "GET" and range_header.startswith("bytes=") and fault != "oversend":
            start = min(int(range_header[6:].split("-")[0] or 0), len(data))
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{etag}"')
        if lfs:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(declared))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if method == "GET" and fault == "oversend":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            return self._oversend(repo_id, path)
        self.send_header("Content-Length", str(declared - start if method == "HEAD" else
                                              len(data) - start))
        self.end_headers()
        if method == "HEAD":
            return
        # "drop": the connection always breaks at the middle of the file, resumed or not.
        body = data[start:len(data) // 2] if fault == "drop" else data[start:]
        self.wfile.write(body)
        self.wfile.flush()
        self.hub.sent_bytes[(repo_id, path)] = len(body)
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _oversend(self, repo_id, path):
        chunk = b"x" * 2**20
        sent = 0
        try:
            while sent < OVERSEND_BYTES:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client stopped reading
            pass
        self.hub.sent_bytes[(repo_id, path)] = sent
        self.close_connection = True

    # ------------------------------------------------------------------------------ API

    def _api(self, method, parts, query, body):
        repo_id = f"{parts[0]}/{parts[1]}"
        action = parts[2] if len(parts) > 2 else None
        revision = urllib.parse.unquote(parts[3]) if len(parts) > 3 else "main"
        if method == "GET" and action in (None, "revision"):
            return self._model_info(repo_id, revision, query)
        if method == "GET" and action == "tree":
            _, commit = self._repo(repo_id, revision)
            tree = self.hub.files(repo_id, commit)
            return self._json(200, [
                {"type": "file", "path": p, "size": len(d), "oid": git_blob_id(d)}
                for p, d in sorted(tree.items())
            ])
        if method == "POST" and action == "preupload":
            self._user(required=True)
            repo, commit = self._repo(repo_id, revision)
            tree = self.hub.files(repo_id, commit)
            files = json.loads(body)["files"]
            return self._json(200, {"commitOid": commit, "files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_id(tree[f["path"]]) if f["path"] in tree else None}
                for f in files
            ]})
        if method == "POST" and action == "commit":
            return self._commit(repo_id, revision, body)
        raise _HubError(404, message=f"no route for {method} {'/'.join(parts)}")

    def _model_info(self, repo_id, revision, query):
        _, commit = self._repo(repo_id, revision)
        tree = self.hub.files(repo_id, commit)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, data in sorted(tree.items()):
            sibling = {"rfilename": path}
            if blobs:
                fault = self.hub.faults.get((repo_id, path))
                sibling.update(size=fault if isinstance(fault, int) else len(data),
                               blobId=git_blob_id(data))
            siblings.append(sibling)
        return self._json(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id,
            "modelId": repo_id, "sha": commit, "private": self.hub.repos[repo_id]["private"],
            "siblings": siblings, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
        })

    def _create_repo(self, payload):
        user = self._user(required=True)
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self.hub.add_repo(repo_id, {".gitattributes": b"*.h5 filter=lfs\n"},
                          private=payload.get("visibility") == "private")
        return self._json(200, {"url": url, "name": repo_id})

    def _commit(self, repo_id, revision, body):
        self._user(required=True)
        repo, _ = self._repo(repo_id, None)
        if revision not in repo["refs"]:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        message, changes = "commit", {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
            elif item["key"] == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
            else:
                raise _HubError(400, message=f"this server takes inline files only: {item['key']}")
        commit = self.hub.commit(repo_id, changes, revision, message)
        return self._json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit}",
                                "commitOid": commit, "pullRequestUrl": None})


if __name__ == "__main__":  # python tests/hub_server.py: serve until interrupted
    with HubServer() as server:
        print(server.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            sys.exit(0)
