"""A local Hugging Face hub for pull tests: the endpoints huggingface_hub calls, served from folders on disk.

- ``GET /api/models/{repo}[/revision/{rev}]``: the repository's info (``sha``, ``siblings``).
- ``GET /api/models/{repo}/tree/{rev}``: the file listing (``oid`` = git blob sha1, ``lfs`` with the sha256 for weights).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files) and ``Content-Length``; ``Range`` requests answered with 206.
Faults for the tests: ``cut`` (a file's first GET stops half-way and the connection closes), ``corrupt`` (a file's
bytes differ from the listing's hash).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".model")


class Hub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.cut: set[str] = set()
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, folder: Path, extra: dict[str, bytes] | None = None) -> None:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo] = {**files, **(extra or {})}

    def sha(self, repo: str) -> str:
        return hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in
                                        self.repos[repo].items())).encode()).hexdigest()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, value, code=200):
            body = json.dumps(value).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self, what="Repository not found"):
            body = json.dumps({"error": what}).encode()
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound" if what.startswith("Repo") else "EntryNotFound")
            self.send_header("X-Error-Message", what)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self, head: bool):
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range", "")))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/.*)?)?", path)
            if m:
                repo, kind, _rev = m.groups()
                if repo not in hub.repos:
                    return self._not_found()
                files = hub.repos[repo]
                if kind in (None, "revision"):
                    return self._json({"id": repo, "modelId": repo, "sha": hub.sha(repo), "private": False,
                                       "siblings": [{"rfilename": n} for n in files]})
                listing = []
                for name, data in files.items():
                    entry = {"type": "file", "path": name, "size": len(data), "oid": _blob_sha1(data)}
                    if name.endswith(LFS_SUFFIXES):
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    listing.append(entry)
                return self._json(listing)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not m or m.group(1) not in hub.repos or m.group(3) not in hub.repos[m.group(1)]:
                return self._not_found("Entry not found" if m and m.group(1) in hub.repos else "Repository not found")
            repo, _rev, name = m.groups()
            data = hub.repos[repo][name]
            served = bytes([data[0] ^ 1]) + data[1:] if name in hub.corrupt else data
            lfs = name.endswith(LFS_SUFFIXES)
            etag = hashlib.sha256(data).hexdigest() if lfs else _blob_sha1(data)
            start = 0
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng and not head:
                start = int(rng.group(1))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", hub.sha(repo))
            self.send_header("ETag", f'"{etag}"')
            if lfs:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            if head:
                self.end_headers()
                return
            cut = name in hub.cut and not start
            if cut:
                hub.cut.discard(name)
                self.send_header("Connection", "close")
            self.end_headers()
            body = served[start:]
            if cut:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(0.3)  # the client reads what came before the connection closes
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_GET(self):
            self._route(False)

        def do_HEAD(self):
            self._route(True)

    return Handler
