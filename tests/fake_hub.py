"""A fake Hugging Face Hub on 127.0.0.1 (stdlib only).

In-memory dataset repos behind the endpoints `huggingface_hub` 2.x and `datasets` 5.x call: repo
creation, info, paginated tree listing, paths-info, preupload, NDJSON commits, file download,
and both ways file contents reach the Hub:

- Xet, the default whenever `hf_xet` is installed: a write token from the Hub
  (`/api/datasets/{repo}/xet-write-token/{rev}`), then the CAS API on the same server (global
  dedup query, xorb upload grants with their upload URL and commit, direct `/v1/xorbs`, and
  `/v1/shards`). Xorbs are parsed (tests/xet_formats.py: chunk headers; LZ4 and byte-grouped
  LZ4 chunks decoded), and a shard makes each file it lists whole again from the stored xorbs;
  the file counts as uploaded only if its bytes hash to the sha256 the shard states, the oid
  the commit names.
  Xorb and chunk hashes (keyed BLAKE3) are taken on trust: the standard library lacks BLAKE3.
- The legacy LFS batch API + PUT (clients with `HF_HUB_DISABLE_XET=1` or without `hf_xet`).

Downloads are plain HTTP `resolve` (no `X-Xet-Hash` header), which every client can read, with
a `Range` answered 206 as the Hub answers it (fsspec's `HfFileSystem` reads files in ranges).
Every commit stays readable by its sha (`hf://datasets/u/r@sha/...`); `main` is the head.

What breaks real pushes is answered as the Hub answers it: 401 for a token it does not know
(anonymous reads of public repos are fine, of private ones 401 RepoNotFound), 409 on creating an
existing repo, 412 on a commit whose `parentCommit` is not the head, injected faults
(`fail`: 429 with `Retry-After`, 5xx, once or forever) and listings cut into pages of
`page_size` with a `Link: rel="next"` header. Repos whose name starts with `forbidden` answer
every write with 403 and echo the request's Authorization header in the error body, to prove
clients keep tokens out of their messages. `requests` records every request with its status.

Clients must run with `HF_ENDPOINT=<url>` set before they import those libraries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlparse

from tests.xet_formats import (  # noqa: F401 - the decoders are imported from here too
    bg4_ungroup,
    crc64_nvme,
    lz4_decompress,
    parse_shard,
    xet_hash_hex,
    xorb_chunks,
)

LFS_SUFFIXES = (".parquet", ".png", ".tar", ".gz", ".npz")
INITIAL_SHA = "0" * 40


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# -- the Hub ------------------------------------------------------------------------------------


@dataclass
class Request:
    """One request the server answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    auth: str
    status: int = 0


@dataclass
class Fault:
    """Answer matching requests with `statuses` in turn (the last one forever if `forever`)."""

    method: str
    pattern: str
    statuses: list[int]
    headers: dict[str, str]
    forever: bool = False


@dataclass
class Grant:
    """A xorb upload grant: where to PUT the xorb, and what it must be."""

    xorb: str
    length: int
    checksum: int
    data: bytes | None = None


class Repo:
    """A dataset repo: files at the head commit, which of them are LFS, and the head."""

    def __init__(self, repo_id: str, private: bool):
        self.repo_id = repo_id
        self.private = private
        self.files: dict[str, bytes] = {}
        self.lfs: set[str] = set()
        self.commits = 0
        self.sha = INITIAL_SHA
        self.history: dict[str, tuple[dict[str, bytes], frozenset[str]]] = {}

    def entry(self, path: str) -> dict:
        data = self.files[path]
        item = {"type": "file", "path": path, "size": len(data), "oid": _blob_id(data)}
        if path in self.lfs:  # git holds the LFS pointer: the oid is the pointer's blob id
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\n"
            pointer += f"size {len(data)}\n"
            item["oid"] = _blob_id(pointer.encode())
            item["lfs"] = {"oid": sha, "size": len(data), "pointerSize": len(pointer)}
        return item

    def commit(self, changes: dict[str, bytes | None], lfs: Iterable[str] = ()) -> str:
        """Apply one commit (None deletes a path); return the new head."""
        lfs = set(lfs)
        for path, data in changes.items():
            if data is None:
                self.files.pop(path, None)
                self.lfs.discard(path)
            else:
                self.files[path] = data
                (self.lfs.add if path in lfs else self.lfs.discard)(path)
        self.commits += 1
        self.sha = hashlib.sha1(f"{self.repo_id}:{self.commits}".encode()).hexdigest()
        self.history[self.sha] = (dict(self.files), frozenset(self.lfs))
        return self.sha

    def at(self, revision: str) -> Repo | None:
        """The repo as of `revision` (the branch `main` or a commit sha), or None if unknown."""
        if revision in ("main", self.sha):
            return self
        if revision not in self.history:
            return None
        old = Repo(self.repo_id, self.private)
        files, lfs = self.history[revision]
        old.files, old.lfs, old.sha = dict(files), set(lfs), revision
        return old


class FakeHub:
    """`with FakeHub(tokens=...) as hub:` serves on `hub.url` from a background thread.

    `tokens` are the Hub tokens it accepts (all of user `tester`, who may write anywhere);
    `page_size` caps each page of a tree listing (the Hub's is 1000).
    """

    def __init__(self, tokens: Iterable[str] = ("hf_dummy_env_token",), page_size: int = 1000):
        self.tokens = set(tokens)
        self.page_size = page_size
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # file contents by sha256 (LFS PUT or Xet shard)
        self.uploaded: list[str] = []  # sha256 of every file content received, in order
        self.xorbs: dict[str, list[bytes]] = {}  # xorb hash -> its decompressed chunks
        self.grants: dict[str, Grant] = {}
        self.xet_tokens: dict[str, str] = {}  # CAS access token -> "read" | "write"
        self.created: list[dict] = []  # bodies of the repo creation requests
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.hooks: dict[str, Callable[[Repo], None]] = {}
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def uploads(self) -> list[str]:
        """The sha256 of every file content uploaded so far (through Xet or LFS)."""
        return list(self.uploaded)

    def fail(
        self,
        method: str,
        pattern: str,
        statuses: list[int],
        headers: dict[str, str] | None = None,
        forever: bool = False,
    ) -> None:
        """Answer requests `method` on a path matching regex `pattern` with `statuses`."""
        self.faults.append(Fault(method, pattern, list(statuses), headers or {}, forever))

    def after_listing(self, repo_id: str, hook: Callable[[Repo], None]) -> None:
        """Run `hook(repo)` once, right after the last page of a listing of `repo_id`."""
        self.hooks[repo_id] = hook

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        """How many `method` requests on paths matching `pattern` (answered `status`)."""
        return sum(
            1
            for r in list(self.requests)
            if r.method == method
            and re.fullmatch(pattern, r.path)
            and (status is None or r.status == status)
        )


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        request_record: Request

        def log_message(self, *args):  # quiet
            pass

        # -- helpers ------------------------------------------------------------------
        def _send(self, status: int, body: bytes | dict | list = b"", headers=None, head=False):
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.request_record.status = status
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head=False, headers=None):
            headers = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
            self._send(status, {"error": message}, headers, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _bearer(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[7:] if auth.startswith("Bearer ") else None

        def _user(self) -> str | None:
            return "tester" if self._bearer() in hub.tokens else None

        def _repo(self, repo_id: str, head=False) -> Repo | None:
            """The repo, if it exists and this request may read it (else the Hub's error)."""
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self._user() is None):
                status = 401 if self._user() is None else 404  # the Hub hides private repos
                self._error(status, "RepoNotFound", f"Repository {repo_id} not found", head)
                return None
            return repo

        def _revision(self, repo: Repo | None, revision: str, head=False) -> Repo | None:
            """The readable `repo` as of `revision`, or None once the error is answered."""
            if repo is None:
                return None
            found = repo.at(revision)
            if found is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return found

        def _writable(self, repo_id: str) -> bool:
            if self._user() is None:
                self._error(401, "Unauthorized", "You must be authenticated to write")
                return False
            if repo_id.split("/")[-1].startswith("forbidden"):
                auth = self.headers.get("Authorization", "")
                self._error(403, "Forbidden", f"write access refused for {auth}")
                return False
            return True

        def _fault(self, method: str, path: str) -> bool:
            with hub.lock:
                for fault in hub.faults:
                    if fault.method == method and re.fullmatch(fault.pattern, path):
                        if not fault.statuses:
                            continue
                        status = fault.statuses[0]
                        if len(fault.statuses) > 1 or not fault.forever:
                            fault.statuses.pop(0)
                        break
                else:
                    return False
            self._body()
            message = f"injected fault {status}"
            self._error(status, "Injected", message, method == "HEAD", fault.headers)
            return True

        # -- routes -------------------------------------------------------------------
        def do_HEAD(self):
            self._route("HEAD")

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def _route(self, method: str):
            url = urlparse(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            self.request_record = Request(
                method, path, query, self.headers.get("Authorization", "")
            )
            with hub.lock:
                hub.requests.append(self.request_record)
            head = method == "HEAD"
            if self._fault(method, path):
                return
            if re.match(r"/v\d+/|/xorb-upload/", path):
                return self._cas(method, path)
            if self._bearer() is not None and self._user() is None:
                self._body()
                message = "Invalid credentials in Authorization header"
                return self._error(401, "Unauthorized", message, head)
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if m and method == "GET":
                return self._info(m.group(1), m.group(2) or "main")
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if m and method == "GET":
                return self._tree(m.group(1), m.group(2), m.group(3) or "", query)
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path)
            if m and method == "POST":
                return self._paths_info(m.group(1), m.group(2))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/preupload/([^/]+)", path)
            if m and method == "POST":
                return self._preupload(m.group(1))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/commit/([^/]+)", path)
            if m and method == "POST":
                return self._commit(m.group(1))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/xet-(read|write)-token/([^/]+)", path)
            if m and method == "GET":
                return self._xet_token(m.group(1), m.group(2))
            m = re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m and method == "POST":
                return self._lfs_batch(m.group(1))
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if m and method == "PUT":
                return self._lfs_put(m.group(1))
            m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m and method in ("GET", "HEAD"):
                return self._resolve(m.group(1), m.group(2), m.group(3), head)
            if path == "/api/repos/create" and method == "POST":
                return self._create()
            if path == "/api/validate-yaml" and method == "POST":
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            if path == "/api/whoami-v2":
                if self._user() is None:
                    return self._error(401, "Unauthorized", "Invalid user token")
                return self._send(200, {"name": "tester", "type": "user", "orgs": []})
            self._body()
            self._error(404, "EntryNotFound", f"no route {method} {path}", head)

        def _create(self):
            request = json.loads(self._body() or b"{}")
            repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
            if not self._writable(repo_id):
                return
            with hub.lock:
                hub.created.append(request)
                if repo_id in hub.repos:
                    url = f"{hub.url}/datasets/{repo_id}"
                    body = {"error": "You already created this dataset repo", "url": url}
                    return self._send(409, body, {"X-Error-Code": "RepoExists"})
                private = request.get("visibility") == "private" or bool(request.get("private"))
                hub.repos[repo_id] = Repo(repo_id, private)
            self._send(200, {"url": f"{hub.url}/datasets/{repo_id}", "name": repo_id})

        def _info(self, repo_id: str, revision: str):
            repo = self._revision(self._repo(repo_id), revision)
            if repo:
                self._send(
                    200,
                    {
                        "id": repo_id,
                        "_id": repo_id,
                        "sha": repo.sha,
                        "private": repo.private,
                        "gated": False,
                        "disabled": False,
                        "downloads": 0,
                        "likes": 0,
                        "tags": [],
                        "lastModified": "2026-01-01T00:00:00.000Z",
                        "createdAt": "2026-01-01T00:00:00.000Z",
                        "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                        "cardData": {},
                    },
                )

        def _tree(self, repo_id: str, revision: str, folder: str, query):
            repo = self._revision(self._repo(repo_id), revision)
            if not repo:
                return
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = folder.strip("/") + "/" if folder.strip("/") else ""
            if prefix and not any(p.startswith(prefix) for p in repo.files):
                return self._error(404, "EntryNotFound", f"{folder} does not exist")
            entries, folders = [], set()
            for path in sorted(repo.files):
                if not path.startswith(prefix):
                    continue
                parts = path[len(prefix) :].split("/")
                for depth in range(1, len(parts)):
                    if recursive or depth == 1:
                        folders.add(prefix + "/".join(parts[:depth]))
                if recursive or len(parts) == 1:
                    entries.append(repo.entry(path))
            dirs = [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders]
            listing = sorted(dirs, key=lambda d: d["path"]) + entries
            cursor = query.get("cursor", [""])[0]
            start = int(base64.urlsafe_b64decode(cursor).decode()) if cursor else 0
            page, headers = listing[start : start + hub.page_size], {}
            if start + hub.page_size < len(listing):
                after = {k: v[0] for k, v in query.items() if k != "cursor"}
                after["cursor"] = base64.urlsafe_b64encode(str(start + hub.page_size).encode())
                link = f"{hub.url}{urlparse(self.path).path}?{urlencode(after)}"
                headers["Link"] = f'<{link}>; rel="next"'
            self._send(200, page, headers)
            if "Link" not in headers:
                with hub.lock:
                    hook = hub.hooks.pop(repo_id, None)
                    if hook is not None:
                        hook(hub.repos[repo_id])

        def _paths_info(self, repo_id: str, revision: str):
            body = self._body().decode()
            repo = self._revision(self._repo(repo_id), revision)
            if not repo:
                return
            try:
                paths = json.loads(body).get("paths", [])
            except json.JSONDecodeError:
                paths = parse_qs(body).get("paths", [])
            out = []
            for path in paths:
                if path in repo.files:
                    out.append(repo.entry(path))
                elif any(p.startswith(path.rstrip("/") + "/") for p in repo.files):
                    out.append({"type": "directory", "path": path, "oid": "0" * 40, "size": 0})
            self._send(200, out)

        def _preupload(self, repo_id: str):
            request = json.loads(self._body() or b"{}")
            if not self._writable(repo_id) or not self._repo(repo_id):
                return
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                }
                for f in request.get("files", [])
            ]
            self._send(200, {"files": files, "commitOid": hub.repos[repo_id].sha})

        def _lfs_batch(self, repo_id: str):
            request = json.loads(self._body() or b"{}")
            if not self._writable(repo_id) or not self._repo(repo_id):
                return
            objects = []
            for obj in request.get("objects", []):
                item = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.objects:  # already stored objects need no upload
                    href = f"{hub.url}/lfs-upload/{obj['oid']}"
                    item["actions"] = {"upload": {"href": href}}
                objects.append(item)
            self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "x"})

        def _lfs_put(self, oid: str):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, "BadRequest", "sha256 differs from the oid")
            with hub.lock:
                hub.objects[oid] = data
                hub.uploaded.append(oid)
            self._send(200, {})

        def _commit(self, repo_id: str):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not self._writable(repo_id):
                return
            repo = self._repo(repo_id)
            if not repo:
                return
            with hub.lock:
                changes: dict[str, bytes | None] = {}
                lfs = set()
                for line in lines:
                    key, value = line["key"], line["value"]
                    if key == "header":
                        parent = value.get("parentCommit")
                        if parent is not None and parent != repo.sha:
                            return self._error(
                                412,
                                "PreconditionFailed",
                                "A commit has happened since. Please refresh and try again.",
                            )
                    elif key == "file":
                        changes[value["path"]] = base64.b64decode(value["content"])
                    elif key == "lfsFile":
                        if value["oid"] not in hub.objects:
                            return self._error(400, "BadRequest", f"missing LFS {value['oid']}")
                        changes[value["path"]] = hub.objects[value["oid"]]
                        lfs.add(value["path"])
                    elif key == "deletedFile":
                        changes[value["path"]] = None
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        changes.update({p: None for p in repo.files if p.startswith(prefix)})
                sha = repo.commit(changes, lfs)
            url = f"{hub.url}/datasets/{repo_id}/commit/{sha}"
            self._send(200, {"commitUrl": url, "commitOid": sha})

        def _resolve(self, repo_id: str, revision: str, path: str, head: bool):
            repo = self._revision(self._repo(repo_id, head), revision, head)
            if not repo:
                return
            if path not in repo.files:
                return self._error(404, "EntryNotFound", f"{path} not found", head)
            data = repo.files[path]
            etag = hashlib.sha256(data).hexdigest() if path in repo.lfs else _blob_id(data)
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if path in repo.lfs:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
            if wanted is None:
                return self._send(200, data, headers, head=head)
            first, last = wanted.groups()
            if first:  # `a-b` or `a-`; else `-n`, the last n bytes
                start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
            else:
                start, stop = max(len(data) - int(last or 0), 0), len(data)
            if start >= len(data) or stop <= start:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._error(
                    416, "RangeNotSatisfiable", "range not satisfiable", head, headers
                )
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            self._send(206, data[start:stop], headers, head=head)

        # -- Xet ----------------------------------------------------------------------
        def _xet_token(self, repo_id: str, scope: str):
            if (scope == "write" and not self._writable(repo_id)) or not self._repo(repo_id):
                return
            token, expires = f"xet_{scope}_{len(hub.xet_tokens)}", int(time.time()) + 3600
            with hub.lock:
                hub.xet_tokens[token] = scope
            headers = {
                "X-Xet-Cas-Url": hub.url,
                "X-Xet-Access-Token": token,
                "X-Xet-Token-Expiration": str(expires),
            }
            self._send(200, {"accessToken": token, "exp": expires, "casUrl": hub.url}, headers)

        def _cas(self, method: str, path: str):
            body = self._body()
            m = re.fullmatch(r"/xorb-upload/([0-9a-f]+)", path)
            if m and method == "PUT":  # the grant's URL: like a presigned one, no credentials
                return self._grant_upload(m.group(1), body)
            scope = hub.xet_tokens.get(self._bearer() or "")
            if scope is None or (method == "POST" and scope != "write"):
                return self._error(401, "Unauthorized", "no valid CAS write token")
            m = re.fullmatch(r"/v1/chunks/([^/]+)/([0-9a-f]{64})", path)
            if m and method == "GET":  # global dedup: nothing is shared across sessions here
                return self._error(404, "NotFound", "chunk not tracked")
            m = re.fullmatch(r"/v1/xorb-grants/([^/]+)/([0-9a-f]{64})", path)
            if m and method == "POST":
                return self._grant(m.group(2), json.loads(body))
            m = re.fullmatch(r"/v1/xorb-commits/([^/]+)/([0-9a-f]{64})/grant/([0-9a-f]+)", path)
            if m and method == "POST":
                return self._grant_commit(m.group(2), m.group(3))
            m = re.fullmatch(r"/v1/xorbs/([^/]+)/([0-9a-f]{64})", path)
            if m and method == "POST":
                return self._xorb(m.group(2), body)
            if path == "/v1/shards" and method == "POST":
                return self._shard(body)
            # e.g. POST /v2/shards: absent, so clients fall back to /v1/shards
            self._error(404, "NotFound", f"no route {method} {path}")

        def _store_xorb(self, xorb_hash: str, data: bytes) -> bool:
            try:
                chunks = xorb_chunks(data)
            except (ValueError, IndexError) as err:
                self._error(400, "BadRequest", f"xorb {xorb_hash}: {err}")
                return False
            with hub.lock:
                hub.xorbs[xorb_hash] = chunks
            return True

        def _xorb(self, xorb_hash: str, data: bytes):
            inserted = xorb_hash not in hub.xorbs
            if self._store_xorb(xorb_hash, data):
                self._send(200, {"was_inserted": inserted})

        def _grant(self, xorb_hash: str, request: dict):
            if xorb_hash in hub.xorbs:
                return self._send(200, {})  # already stored: nothing to upload
            checksum = request.get("checksum") or {}
            if checksum.get("algo") != "crc64nvme":
                return self._error(400, "BadRequest", f"unknown checksum {checksum}")
            grant_id = hashlib.sha1(f"{xorb_hash}:{len(hub.grants)}".encode()).hexdigest()
            with hub.lock:
                hub.grants[grant_id] = Grant(
                    xorb_hash, int(request["length"]), int(checksum["value"])
                )
            url = f"{hub.url}/xorb-upload/{grant_id}"
            self._send(201, {"id": grant_id, "method": "PUT", "url": url, "headers": {}})

        def _grant_upload(self, grant_id: str, data: bytes):
            grant = hub.grants.get(grant_id)
            if grant is None:
                return self._error(404, "NotFound", "no such grant")
            if len(data) != grant.length or crc64_nvme(data) != grant.checksum:
                return self._error(400, "BadDigest", "length or CRC-64/NVME differs")
            grant.data = data
            self._send(200, b"")

        def _grant_commit(self, xorb_hash: str, grant_id: str):
            grant = hub.grants.get(grant_id)
            if grant is None or grant.xorb != xorb_hash or grant.data is None:
                return self._error(404, "NotFound", "no data uploaded for this grant")
            inserted = xorb_hash not in hub.xorbs
            if self._store_xorb(xorb_hash, grant.data):
                self._send(200, {"was_inserted": inserted})

        def _shard(self, data: bytes):
            try:
                files = parse_shard(data)
            except (ValueError, struct.error) as err:
                return self._error(400, "BadRequest", f"shard: {err}")
            contents = []
            for file in files:
                parts = []
                for xorb_hash, unpacked, start, end in file.terms:
                    chunks = hub.xorbs.get(xorb_hash)
                    if chunks is None or end > len(chunks) or start >= end:
                        message = f"file {file.file_hash}: xorb {xorb_hash} [{start}, {end})"
                        return self._error(400, "BadRequest", message + " not uploaded")
                    segment = b"".join(chunks[start:end])
                    if len(segment) != unpacked:
                        return self._error(400, "BadRequest", f"{xorb_hash}: size differs")
                    parts.append(segment)
                content = b"".join(parts)
                digest = hashlib.sha256(content).digest()
                if file.sha256 is None or xet_hash_hex(file.sha256) != digest.hex():
                    return self._error(400, "BadRequest", f"{file.file_hash}: sha256 differs")
                contents.append(content)
            with hub.lock:
                for content in contents:
                    sha = hashlib.sha256(content).hexdigest()
                    hub.objects[sha] = content
                    hub.uploaded.append(sha)
            self._send(200, {"result": 1})

    return Handler


# -- small built datasets for the publishing tests -------------------------------------------


def write_release(root):
    """A 24-image synthetic ChestX-ray14-shaped release (small images: fast builds)."""
    from mgll_data.demo.nih_release import write_demo_release

    if not root.exists():
        write_demo_release(root, n=24, seed=0, image_size=128)
    return root


def pipeline_variant(folder, name="chestxray14", **licence):
    """The shipped chestxray14 pipeline YAML with another name and/or licence, as a file."""
    import yaml

    from mgll_data.build.pipeline import load_pipeline

    raw = dict(load_pipeline("chestxray14").raw)
    raw["name"] = name
    raw["license"] = {**raw["license"], **licence}
    path = folder / f"{name}-{licence.get('redistribution', 'public')}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=True))
    return str(path)


def build_dataset(release, out, pipeline="chestxray14", rows_per_shard=4):
    """Build `pipeline` (name or YAML path) from `release` into `out` with 64-pixel images."""
    from mgll_data.build.engine import BuildOptions, build
    from mgll_data.build.pipeline import load_pipeline

    options = BuildOptions(
        image_size=64, rows_per_shard=rows_per_shard, overwrite=True, progress=False
    )
    build(load_pipeline(pipeline), release, out, options)
    return out
