"""A fake Hugging Face Hub on 127.0.0.1 (stdlib only), per shared/reference/dependencies.md §3.

In-memory dataset repos with the endpoints `huggingface_hub` 2.x and `datasets` 5.x call for
create_repo, create_commit (preupload, LFS batch + PUT, NDJSON commit), tree listing, and file
download. Clients must run with `HF_ENDPOINT=<url>` and `HF_HUB_DISABLE_XET=1` set before they
import those libraries. `log` records every request so tests can count uploads.

Repos whose name starts with `forbidden` answer every write with 403 and echo the request's
Authorization header in the error body, to prove clients keep tokens out of their messages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".parquet", ".png", ".tar", ".npz")


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.files: dict[str, bytes] = {}
        self.lfs: set[str] = set()
        self.commits = 0
        self.sha = "0" * 40

    def entry(self, path: str) -> dict:
        data = self.files[path]
        item = {"type": "file", "path": path, "size": len(data), "oid": _blob_id(data)}
        if path in self.lfs:
            sha = hashlib.sha256(data).hexdigest()
            item["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
        return item


class FakeHub:
    """`with FakeHub() as hub:` serves on `hub.url` from a background thread."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS store: sha256 -> bytes
        self.log: list[tuple[str, str]] = []
        self.auth: set[str] = set()  # Authorization headers seen
        self.lock = threading.Lock()
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
        """LFS objects PUT so far (their oids)."""
        return [path.rsplit("/", 1)[1] for method, path in self.log if method == "PUT"]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # -- helpers ------------------------------------------------------------------
        def _send(self, status: int, body: bytes | dict | list = b"", headers=None, head=False):
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head=False):
            self._send(status, {"error": message}, {"X-Error-Code": code}, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _repo(self, repo_id: str, head=False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return repo

        def _forbidden(self, repo_id: str) -> bool:
            if repo_id.split("/")[-1].startswith("forbidden"):
                auth = self.headers.get("Authorization", "")
                self._error(403, "Forbidden", f"write access refused for {auth}")
                return True
            return False

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
            with hub.lock:
                hub.log.append((method, path))
                hub.auth.add(self.headers.get("Authorization", ""))
            head = method == "HEAD"
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if m and method == "GET":
                return self._info(m.group(1))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if m and method == "GET":
                return self._tree(m.group(1), m.group(3) or "", query)
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path)
            if m and method == "POST":
                return self._paths_info(m.group(1))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/preupload/([^/]+)", path)
            if m and method == "POST":
                return self._preupload(m.group(1))
            m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/commit/([^/]+)", path)
            if m and method == "POST":
                return self._commit(m.group(1))
            m = re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m and method == "POST":
                return self._lfs_batch(m.group(1))
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if m and method == "PUT":
                return self._lfs_put(m.group(1))
            m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m and method in ("GET", "HEAD"):
                return self._resolve(m.group(1), m.group(3), head)
            if path == "/api/repos/create" and method == "POST":
                return self._create()
            if path == "/api/validate-yaml" and method == "POST":
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            if path == "/api/whoami-v2":
                return self._send(200, {"name": "tester", "type": "user", "orgs": []})
            self._body()
            self._error(404, "EntryNotFound", f"no route {method} {path}", head)

        def _create(self):
            request = json.loads(self._body() or b"{}")
            repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
            if self._forbidden(repo_id):
                return
            with hub.lock:
                if repo_id in hub.repos:
                    url = f"{hub.url}/datasets/{repo_id}"
                    body = {"error": "You already created this dataset repo", "url": url}
                    return self._send(409, body, {"X-Error-Code": "RepoExists"})
                hub.repos[repo_id] = Repo(bool(request.get("private")))
            self._send(200, {"url": f"{hub.url}/datasets/{repo_id}", "name": repo_id})

        def _info(self, repo_id: str):
            repo = self._repo(repo_id)
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

        def _tree(self, repo_id: str, folder: str, query):
            repo = self._repo(repo_id)
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
                rest = path[len(prefix) :]
                parts = rest.split("/")
                for depth in range(1, len(parts)):
                    if recursive or depth == 1:
                        folders.add(prefix + "/".join(parts[:depth]))
                if recursive or len(parts) == 1:
                    entries.append(repo.entry(path))
            dirs = [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders]
            self._send(200, sorted(dirs, key=lambda d: d["path"]) + entries)

        def _paths_info(self, repo_id: str):
            body = self._body().decode()
            repo = self._repo(repo_id)
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
            if self._forbidden(repo_id) or not self._repo(repo_id):
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
            self._send(200, {})

        def _commit(self, repo_id: str):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if self._forbidden(repo_id):
                return
            repo = self._repo(repo_id)
            if not repo:
                return
            with hub.lock:
                for line in lines:
                    key, value = line["key"], line["value"]
                    if key == "file":
                        repo.files[value["path"]] = base64.b64decode(value["content"])
                        repo.lfs.discard(value["path"])
                    elif key == "lfsFile":
                        if value["oid"] not in hub.objects:
                            return self._error(400, "BadRequest", f"missing LFS {value['oid']}")
                        repo.files[value["path"]] = hub.objects[value["oid"]]
                        repo.lfs.add(value["path"])
                    elif key == "deletedFile":
                        repo.files.pop(value["path"], None)
                        repo.lfs.discard(value["path"])
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        for path in [p for p in repo.files if p.startswith(prefix)]:
                            repo.files.pop(path)
                            repo.lfs.discard(path)
                repo.commits += 1
                repo.sha = hashlib.sha1(f"{repo_id}:{repo.commits}".encode()).hexdigest()
            url = f"{hub.url}/datasets/{repo_id}/commit/{repo.sha}"
            self._send(200, {"commitUrl": url, "commitOid": repo.sha})

        def _resolve(self, repo_id: str, path: str, head: bool):
            repo = self._repo(repo_id, head)
            if not repo:
                return
            if path not in repo.files:
                return self._error(404, "EntryNotFound", f"{path} not found", head)
            data = repo.files[path]
            etag = hashlib.sha256(data).hexdigest() if path in repo.lfs else _blob_id(data)
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"'}
            if path in repo.lfs:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            self._send(200, data, headers, head=head)

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
