"""A local stand-in for the Hugging Face hub (HF_ENDPOINT=mock.url): dataset repositories
with branches and commits, answering the three calls smedjan makes (dataset_info,
list_repo_tree, hf_hub_download's HEAD + ranged GET) as the hub does, errors included
(X-Error-Code), ranged requests, and a connection lost mid-download (`cut_after`).
`requests` records every path asked for, so tests can see the network use.

    hub = MockHub()
    hub.add("org/corpus", "a" * 40, {"data/train.parquet": data})
    with hub:
        smedjan("prepare", "-i", "hf://datasets/org/corpus/data/*.parquet", ..., env={"HF_ENDPOINT": hub.url})
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class MockHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[str] = []
        self.ranges: list[str] = []  # Range headers of file downloads (a resumed download sends one)
        self.cut_after: int | None = None  # the next file download breaks off after this many bytes
        self._server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, sha: str, files: dict[str, bytes], ref: str | None = "main") -> None:
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][sha] = dict(files)
        if ref:
            repo["refs"][ref] = sha

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "MockHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ answers
    def _commit(self, repo_id: str, rev: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, "RepoNotFound"
        sha = repo["refs"].get(rev, rev)
        if sha not in repo["commits"]:
            return None, "RevisionNotFound"
        return sha, None

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        self.requests.append(path)
        segs = path.strip("/").split("/")
        if segs[:2] == ["api", "datasets"] and len(segs) >= 6 and segs[4] in ("revision", "tree"):
            repo_id, kind, rev, rest = f"{segs[2]}/{segs[3]}", segs[4], segs[5], "/".join(segs[6:])
        elif segs[:1] == ["datasets"] and len(segs) >= 6 and segs[3] == "resolve":
            repo_id, kind, rev, rest = f"{segs[1]}/{segs[2]}", "resolve", segs[4], "/".join(segs[5:])
        else:
            return self._send(h, 404, b"", {"X-Error-Code": "RepoNotFound"})
        sha, error = self._commit(repo_id, rev)
        if error:
            return self._send(h, 404, json.dumps({"error": error}).encode(), {"X-Error-Code": error})
        files = self.repos[repo_id]["commits"][sha]
        if kind == "revision":
            body = {"id": repo_id, "sha": sha, "private": False, "siblings": [{"rfilename": p} for p in files]}
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        if kind == "tree":
            below = [p for p in files if not rest or p == rest or p.startswith(rest + "/")]
            if rest and not below:
                return self._send(h, 404, b'{"error": "EntryNotFound"}', {"X-Error-Code": "EntryNotFound"})
            body = [{"type": "file", "oid": hashlib.sha1(files[p]).hexdigest(), "size": len(files[p]), "path": p}
                    for p in sorted(below)]
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        if rest not in files:
            return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound"})
        data = files[rest]
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            if not head:
                self.ranges.append(rng)
            start = int(rng[6:].split("-")[0] or 0)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = b"" if head else data[start:]
        if not head and self.cut_after is not None:  # a connection lost mid-transfer
            body, self.cut_after = body[: self.cut_after], None
            h.close_connection = True
        self._send(h, 206 if start else 200, body, headers, head=head)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict, head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)
