"""A local HTTP server standing in for the Hugging Face Hub (``HF_ENDPOINT``), for download tests.

The ``fake_hub`` fixture (registered in ``conftest.py``) starts a :class:`FakeHub` on 127.0.0.1 at a free
port, points ``huggingface_hub`` at it (environment and the module constants read at import) with an empty
cache under ``tmp_path``, and stops it at teardown. A test registers files, runs the code under test, then
reads the log::

    served = serve_random_weights(fake_hub, "timm:vit_tiny_patch16_224", seed=0)
    model, _ = load_vision_model("timm:vit_tiny_patch16_224", pretrained=True)
    assert (served.repo_id, served.filename) in fake_hub.downloaded()

What it answers, as the real hub does for a public repo whose files are plain git / LFS files (no Xet):

- ``HEAD|GET /{repo_id}/resolve/{revision}/{filename}``: small files (``.json`` ...) with 200, ``ETag`` and
  ``X-Repo-Commit``; weight files (LFS extensions) with a 302 carrying ``X-Linked-Etag``, ``X-Linked-Size``,
  ``X-Repo-Commit`` and a ``Location`` on another origin (``localhost`` instead of ``127.0.0.1``, like the
  CDN), where ``/_lfs/{token}`` serves the bytes. No ``X-Xet-Hash`` header: ``huggingface_hub`` downloads over
  HTTP.
- ``GET /api/models/{repo_id}[/revision/{revision}]`` (repo info with ``sha`` and ``siblings``) and
  ``GET /api/models/{repo_id}/tree/{revision}`` (file listing), as ``snapshot_download`` asks;
  ``GET /api/agent-harnesses`` (an empty registry; ``huggingface_hub`` asks once per process).
- unknown repo: 404 ``X-Error-Code: RepoNotFound`` (``RepositoryNotFoundError``); unknown file in a known
  repo: 404 ``X-Error-Code: EntryNotFound`` with ``X-Repo-Commit`` (``RemoteEntryNotFoundError``).
- uploads, as ``create_repo``, ``upload_file`` and ``upload_folder`` make them: ``POST /api/repos/create``,
  ``POST /api/validate-yaml``, ``POST /api/models/{repo_id}/preupload/{revision}`` (every file is "regular":
  its bytes travel base64-encoded in the commit, no LFS or Xet transfer) and ``POST
  /api/models/{repo_id}/commit/ {revision}`` (NDJSON). Committed files are then served like any other;
  ``uploaded()`` lists them.

Any revision is accepted and resolves to one fixed commit per repo. Every request is logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".h5", ".msgpack", ".onnx")


@dataclass(frozen=True)
class HubRequest:
    method: str
    path: str  # as sent, with the query string
    status: int
    repo_id: str | None = None  # set for file requests (resolve and CDN)
    filename: str | None = None


@dataclass
class ServedWeights:
    repo_id: str
    filename: str
    path: Path
    state_dict: dict


def _commit_of(repo_id: str) -> str:
    return hashlib.sha1(f"fake-hub-commit:{repo_id}".encode()).hexdigest()


def _etag_of(path: Path) -> str:
    """A stable id of this file version (the real hub sends the sha256 of LFS files; hashing GBs is not
    needed)."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()


class FakeHub:
    """Files served per repo (``{repo_id: {filename: local path}}``) and the log of requests received."""

    def __init__(self, root: Path):
        self.root = Path(root)  # where helpers write the files they serve
        self.files: dict[str, dict[str, Path]] = {}
        self.requests: list[HubRequest] = []
        self._lfs_tokens: dict[str, tuple[str, str]] = {}
        self._uploads: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- serving ------------------------------------------------------------------------------------------
    def serve(self, repo_id: str, filename: str, path: str | os.PathLike) -> None:
        """Serve the local file ``path`` as ``filename`` of the model repo ``repo_id``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)
        with self._lock:
            self.files.setdefault(repo_id, {})[filename] = path

    def add_repo(self, repo_id: str) -> None:
        """Make ``repo_id`` exist (its missing files then answer EntryNotFound instead of RepoNotFound)."""
        with self._lock:
            self.files.setdefault(repo_id, {})

    # -- the log ------------------------------------------------------------------------------------------
    def downloaded(self) -> list[tuple[str, str]]:
        """``(repo_id, filename)`` of every file whose bytes were sent (GET answered 200), in order."""
        with self._lock:
            return [
                (r.repo_id, r.filename)
                for r in self.requests
                if r.method == "GET" and r.status == 200 and r.filename is not None
            ]

    def uploaded(self) -> list[tuple[str, str]]:
        """``(repo_id, filename)`` of every file committed through the upload API, in order."""
        with self._lock:
            return list(self._uploads)

    def file_requests(self, method: str | None = None) -> list[tuple[str, str, int]]:
        """``(repo_id, filename, status)`` of every request for a file (``method``: only HEAD or only GET)."""
        with self._lock:
            return [
                (r.repo_id, r.filename, r.status)
                for r in self.requests
                if r.filename is not None and (method is None or r.method == method)
            ]

    # -- lifecycle ----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "the fake hub is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """Same server under another origin: ``huggingface_hub`` treats it like the real hub's CDN."""
        return f"http://localhost:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True  # a stuck client connection never blocks the test process
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    # -- request handling (called from the server threads) ------------------------------------------------
    def _log(self, request: HubRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _repo_and_rest(self, path: str) -> tuple[str | None, str]:
        """Split ``org/name/rest`` on a known repo id (the longest that matches)."""
        with self._lock:
            repos = sorted(self.files, key=len, reverse=True)
        for repo_id in repos:
            if path == repo_id or path.startswith(repo_id + "/"):
                return repo_id, path[len(repo_id) + 1 :]
        return None, path

    def _lfs_token(self, repo_id: str, filename: str) -> str:
        token = hashlib.sha1(f"{repo_id}/{filename}".encode()).hexdigest()
        with self._lock:
            self._lfs_tokens[token] = (repo_id, filename)
        return token


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds a silent connection is kept

        def log_message(self, format, *args):  # noqa: A002 - quiet: the hub keeps its own log
            pass

        def do_HEAD(self):
            self._answer(send_body=False)

        def do_GET(self):
            self._answer(send_body=True)

        def do_POST(self):
            raw_path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if raw_path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = (
                    f"{payload['organization']}/{payload['name']}"
                    if payload.get("organization")
                    else payload["name"]
                )
                hub.add_repo(repo_id)
                self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            elif raw_path == "/api/validate-yaml":
                self._json(200, {"errors": [], "warnings": []})
            elif raw_path.startswith("/api/models/") and "/preupload/" in raw_path:
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in json.loads(body)["files"]
                ]
                self._json(200, {"files": files})
            elif raw_path.startswith("/api/models/") and "/commit/" in raw_path:
                self._commit(unquote(raw_path[len("/api/models/") :].rpartition("/commit/")[0]), body)
            else:
                self._error(404, None, "Not found", True)

        def _commit(self, repo_id: str, body: bytes) -> None:
            if repo_id not in hub.files:
                self._error(404, "RepoNotFound", "Repository not found", True, repo_id)
                return
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    path = hub.root / "uploads" / repo_id.replace("/", "--") / item["value"]["path"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(base64.b64decode(item["value"]["content"]))
                    hub.serve(repo_id, item["value"]["path"], path)
                    with hub._lock:
                        hub._uploads.append((repo_id, item["value"]["path"]))
                elif item["key"] != "header":
                    self._error(
                        400, None, f"the fake hub does not commit {item['key']!r} entries", True, repo_id
                    )
                    return
            commit = _commit_of(repo_id)
            self._json(
                200,
                {
                    "commitUrl": f"{hub.url}/{repo_id}/commit/{commit}",
                    "commitOid": commit,
                    "pullRequestUrl": None,
                },
            )

        def _json(self, status: int, body) -> None:
            self._send(
                status,
                json.dumps(body).encode(),
                True,
                {"Content-Type": "application/json"},
                HubRequest(self.command, self.path, status),
            )

        def _answer(self, send_body: bool) -> None:
            raw_path = urlsplit(self.path).path
            if raw_path.startswith("/_lfs/"):
                self._lfs(raw_path[len("/_lfs/") :], send_body)
            elif raw_path == "/api/agent-harnesses":  # asked once per process for the user agent: none known
                data = json.dumps({"standardEnvVars": [], "harnesses": {}}).encode()
                self._send(
                    200,
                    data,
                    send_body,
                    {"Content-Type": "application/json"},
                    HubRequest(self.command, self.path, 200),
                )
            elif raw_path.startswith("/api/models/"):
                self._api(raw_path[len("/api/models/") :], send_body)
            elif "/resolve/" in raw_path:
                self._resolve(raw_path, send_body)
            else:
                self._error(404, None, "Not found", send_body)

        # /{repo_id}/resolve/{revision}/{filename}
        def _resolve(self, raw_path: str, send_body: bool) -> None:
            raw_repo, _, raw_rest = raw_path.lstrip("/").partition("/resolve/")
            repo_id = unquote(raw_repo)
            raw_revision, _, raw_filename = raw_rest.partition("/")
            filename = unquote(raw_filename)
            with hub._lock:
                repo_files = hub.files.get(repo_id)
                local = None if repo_files is None else repo_files.get(filename)
            if repo_files is None:
                self._error(404, "RepoNotFound", "Repository not found", send_body, repo_id, filename)
                return
            commit = _commit_of(repo_id)
            if local is None:
                self._error(
                    404,
                    "EntryNotFound",
                    "Entry not found",
                    send_body,
                    repo_id,
                    filename,
                    {"X-Repo-Commit": commit},
                )
                return
            etag = _etag_of(local)
            if filename.endswith(LFS_SUFFIXES):
                location = f"{hub.cdn_url}/_lfs/{hub._lfs_token(repo_id, filename)}"
                self._send(
                    302,
                    b"",
                    send_body,
                    {
                        "Location": location,
                        "X-Repo-Commit": commit,
                        "X-Linked-Etag": f'"{etag}"',
                        "X-Linked-Size": str(local.stat().st_size),
                        "ETag": f'"{etag[:40]}"',
                    },
                    HubRequest(self.command, self.path, 302, repo_id, filename),
                )
                return
            self._send_file(
                local, send_body, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, repo_id, filename
            )

        def _lfs(self, token: str, send_body: bool) -> None:
            with hub._lock:
                repo_id, filename = hub._lfs_tokens.get(token, (None, None))
                local = hub.files.get(repo_id, {}).get(filename)
            if local is None:
                self._error(404, None, "Not found", send_body)
                return
            self._send_file(local, send_body, {"ETag": f'"{_etag_of(local)}"'}, repo_id, filename)

        # /api/models/{repo_id}[/revision/{rev}] and /api/models/{repo_id}/tree/{rev}[/{path}]
        def _api(self, raw_rest: str, send_body: bool) -> None:
            repo_id, rest = hub._repo_and_rest(unquote(raw_rest))
            if repo_id is None:
                self._error(404, "RepoNotFound", "Repository not found", send_body)
                return
            with hub._lock:
                files = dict(hub.files[repo_id])
            commit = _commit_of(repo_id)
            if rest == "" or rest.startswith("revision/"):
                body = {
                    "_id": commit[:24],
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": False,
                    "disabled": False,
                    "gated": False,
                    "tags": [],
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                }
            elif rest.startswith("tree/"):
                _, _, prefix = rest[len("tree/") :].partition("/")
                body = []
                for name in sorted(files):
                    if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                        continue
                    size = files[name].stat().st_size
                    entry = {"type": "file", "path": name, "size": size, "oid": _etag_of(files[name])[:40]}
                    if name.endswith(LFS_SUFFIXES):
                        entry["lfs"] = {"oid": _etag_of(files[name]), "size": size, "pointerSize": 134}
                    body.append(entry)
            else:
                self._error(404, None, "Not found", send_body)
                return
            data = json.dumps(body).encode()
            self._send(
                200,
                data,
                send_body,
                {"Content-Type": "application/json", "X-Repo-Commit": commit},
                HubRequest(self.command, self.path, 200),
            )

        # -- responses --------------------------------------------------------------------------------------
        def _error(self, status, code, message, send_body, repo_id=None, filename=None, headers=None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message, **(headers or {})}
            if code:
                headers["X-Error-Code"] = code
            data = json.dumps({"error": message}).encode()
            self._send(
                status,
                data,
                send_body,
                headers,
                HubRequest(self.command, self.path, status, repo_id, filename),
            )

        def _send(self, status: int, data: bytes, send_body: bool, headers: dict, logged: HubRequest) -> None:
            hub._log(logged)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if send_body and data:
                self.wfile.write(data)

        def _send_file(
            self, local: Path, send_body: bool, headers: dict, repo_id: str, filename: str
        ) -> None:
            hub._log(HubRequest(self.command, self.path, 200, repo_id, filename))
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(local.stat().st_size))
            self.send_header("Accept-Ranges", "none")
            self.end_headers()
            if send_body:
                with open(local, "rb") as f:
                    try:
                        self.connection.sendfile(f)  # the headers are out: wfile is unbuffered
                    except (BrokenPipeError, ConnectionResetError):
                        pass

    return Handler


def point_hub_clients_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Make ``huggingface_hub`` (this process and subprocesses) use ``endpoint`` online, caching under
    ``home``."""
    import huggingface_hub
    from huggingface_hub import constants, hf_api

    cache = home / "hub"
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub read these when it was imported; the functions read the module attributes at call time
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    # the module-level HfApi (model_info, list_repo_tree ...) kept the endpoint of import time
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # the shared httpx client read the proxy settings when it was created: start a new one now and after
    huggingface_hub.close_session()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running :class:`FakeHub` that ``huggingface_hub`` downloads from, with an empty cache; stopped
    after."""
    import huggingface_hub

    hub = FakeHub(tmp_path / "fake-hub-files").start()
    try:
        point_hub_clients_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub
    finally:
        hub.stop()
        huggingface_hub.close_session()


# -- weights for load_vision_model specs
# ----------------------------------------------------------------------
def _safetensors_name(filename: str, default_bin: str, default_safe: str) -> str:
    """The file timm / open_clip ask for first: the safetensors alternative of a ``.bin`` name."""
    if filename.endswith(".safetensors"):
        return filename
    if filename == default_bin:
        return default_safe
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors"
    raise NotImplementedError(f"no safetensors alternative is looked up for {filename!r}")


def hub_weights_location(spec: str, model=None) -> tuple[str, str]:
    """``(repo_id, filename)`` that ``load_vision_model(spec, pretrained=True)`` downloads first.

    ``model``: for timm, the built model (its ``pretrained_cfg`` names the default tag of a name without one).
    """
    from sae_vision_ext.vision.load import parse_spec

    library, name = parse_spec(spec)
    if library == "timm":
        if model is None:
            import timm

            model = timm.create_model(name, pretrained=False)
        cfg = dict(model.pretrained_cfg)
        if not cfg.get("hf_hub_id"):
            raise ValueError(f"{spec}: timm takes these weights from {cfg.get('url')!r}, not the hub")
        repo_id = cfg["hf_hub_id"].partition("@")[0]
        filename = _safetensors_name(
            cfg.get("hf_hub_filename") or "pytorch_model.bin", "pytorch_model.bin", "model.safetensors"
        )
        return repo_id, filename
    import open_clip

    arch, _, tag = name.partition("/")
    if name.startswith(("hf-hub:", "local-dir:")) or not tag:
        raise NotImplementedError(f"{spec}: only open_clip:<arch>/<tag> specs are served")
    entry = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub")
    if not entry:
        raise ValueError(f"{spec}: open_clip takes these weights from a URL, not the hub")
    repo_id, filename = os.path.split(entry)
    filename = _safetensors_name(
        filename or "open_clip_pytorch_model.bin",
        "open_clip_pytorch_model.bin",
        "open_clip_model.safetensors",
    )
    return repo_id, filename


def serve_random_weights(hub: FakeHub, spec: str, seed: int = 0, **library_kwargs) -> ServedWeights:
    """Build ``spec`` with random weights drawn from ``seed`` and serve them where the loader will look.

    The weights are those of the pretrained resolution (as on the real hub): the loader may then ask for any
    ``img_size`` (timm / open_clip resample the position embeddings). ``library_kwargs`` (e.g. open_clip's
    ``text_cfg``) must be the ones the loader will get: they change the parameter shapes.
    """
    import torch
    from safetensors.torch import save_file

    from sae_vision_ext.vision.load import load_vision_model

    if "img_size" in library_kwargs:
        raise ValueError("weights are served at the pretrained resolution; give img_size to the loader only")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hooked, _ = load_vision_model(spec, pretrained=False, **library_kwargs)
    model = hooked.model
    repo_id, filename = hub_weights_location(spec, model)
    state_dict = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    path = hub.root / repo_id.replace("/", "--") / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path))
    hub.serve(repo_id, filename, path)
    return ServedWeights(repo_id, filename, path, state_dict)
