"""`attncap export --format hub` and `attncap.load("org/name")` against a local stand-in for the Hub.

The stand-in is an HTTP server on 127.0.0.1 with the few endpoints `snapshot_download` calls (repo
info, the file tree, HEAD/GET of each file). Loading runs in a subprocess with `HF_ENDPOINT`
pointing at it, as a user's process would (huggingface_hub reads it at import); no test touches
the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import attncap
from attncap import hub
from attncap.cli import main
from attncap.errors import AttncapError


SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/tiny"

LOAD = """
import json, sys
import attncap
from attncap.errors import AttncapError
image = sys.argv[1]
for source in sys.argv[2:]:
    repo, _, revision = source.partition("@")
    try:
        cap = attncap.load(repo, device="cpu", revision=revision or None)
        print(json.dumps({"source": source, "text": cap(image).text, "folder": str(cap.folder)}))
    except AttncapError as exc:
        print(json.dumps({"source": source, "error": str(exc)}))
"""


class FakeHub(ThreadingHTTPServer):
    """Serves the files of ``repos`` ({repo id: folder}) the way huggingface.co does, at one commit."""

    daemon_threads = True

    def __init__(self, repos: dict[str, Path]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = {repo: {p.name: p.read_bytes() for p in folder.iterdir()}
                      for repo, folder in repos.items()}
        self.requests: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        api = parts[0] == "api" and len(parts) >= 4 and parts[1] == "models"
        repo = "/".join(parts[2:4] if api else parts[0:2])
        files = self.server.repos.get(repo)
        if files is None:
            return self._send(404, b'{"error": "Repository not found"}', body,
                              {"X-Error-Code": "RepoNotFound"})
        rest = parts[4:] if api else parts[2:]
        if len(rest) >= 2 and rest[1] not in ("main", SHA):
            return self._send(404, b'{"error": "Invalid rev id"}', body, {"X-Error-Code": "RevisionNotFound"})
        if api and (not rest or rest[0] == "revision"):         # repo info
            info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": n} for n in sorted(files)]}
            return self._send(200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        if api and rest[0] == "tree":                            # the file list (huggingface_hub >= 1)
            tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for n, d in sorted(files.items())]
            return self._send(200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        if not api and len(rest) >= 3 and rest[0] == "resolve" and "/".join(rest[2:]) in files:
            data = files["/".join(rest[2:])]
            return self._send(200, data, body, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                                "X-Repo-Commit": SHA})
        self._send(404, b'{"error": "Entry not found"}', body, {"X-Error-Code": "EntryNotFound"})

    def _send(self, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@contextlib.contextmanager
def fake_hub(repos: dict[str, Path]):
    server = FakeHub(repos)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def load_in_subprocess(endpoint: str, hf_home: Path, image: Path, *sources: str,
                       offline: bool = False) -> list[dict]:
    """Run `attncap.load(source)` and caption ``image`` in a fresh process; one dict per source."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    result = subprocess.run([sys.executable, "-c", LOAD, str(image), *sources], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory) -> Path:
    """The trained run's best checkpoint and config, with test scores as `evaluate` writes them."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(trained_run / "checkpoints" / "best", run / "checkpoints" / "best")
    shutil.copyfile(trained_run / "config.json", run / "config.json")
    (run / "eval").mkdir()
    (run / "eval" / "scores.json").write_text(json.dumps({"BLEU-4": 0.4321, "CIDEr": 1.234}))
    return run


@pytest.fixture(scope="module")
def hub_folder(evaluated_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "tiny"
    assert main(["export", str(evaluated_run), "--format", "hub", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def image(trained_run) -> Path:
    return sorted((trained_run / "dataset" / "images").glob("*.jpg"))[0]


def test_hub_export_is_a_model_repository_with_card_config_and_commands(hub_folder, evaluated_run, image,
                                                                       tmp_path):
    assert sorted(p.name for p in hub_folder.iterdir()) == [
        "README.md", "attncap-export.json", "config.json", "encoder.safetensors", "model.safetensors",
        "training_config.json", "vocab.json"]
    assert (hub_folder / "training_config.json").read_bytes() == (evaluated_run / "config.json").read_bytes()
    card = (hub_folder / "README.md").read_text()
    front, rest = card.split("---\n", 2)[1:]
    assert card.startswith("---\n") and "library_name: attncap\n" in front
    assert "pipeline_tag: image-to-text\n" in front and "- image-to-text\n" in front
    assert "| BLEU-4 | 0.4321 |" in rest and "| CIDEr | 1.234 |" in rest    # the scores table
    config = json.loads(rest.split("```json\n")[1].split("```")[0])
    assert config == json.loads((evaluated_run / "config.json").read_text())  # the exact config
    assert "attncap train    --run runs/NAME" in rest and "--format hub --out DIR" in rest
    assert 'attncap.load("ORG/NAME")' in rest and "hf upload ORG/NAME DIR" in rest
    assert json.loads((hub_folder / "attncap-export.json").read_text())["format"] == "hub"
    again = tmp_path / "from-checkpoint"                           # not a run: the checkpoint's config
    checkpoint = evaluated_run / "checkpoints" / "best"
    assert main(["export", str(checkpoint), "--format", "hub", "--out", str(again)]) == 0
    assert json.loads((again / "training_config.json").read_text()) == config
    local = attncap.load(hub_folder, device="cpu")                 # a hub folder is a model folder too
    assert local(image).text == attncap.load(evaluated_run, device="cpu")(image).text


def test_load_a_repo_id_from_the_hub_then_offline_from_its_cache(hub_folder, tmp_path, image):
    expected = attncap.load(hub_folder, device="cpu")(image).text
    hf_home = tmp_path / "hf"
    with fake_hub({REPO: hub_folder}) as server:
        server.repos[REPO]["pytorch_model.bin"] = b"a pickle: never fetched"
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        online = load_in_subprocess(endpoint, hf_home, image, REPO, "org/missing", f"{REPO}@nope")
        fetched = sorted(r.split("/")[-1] for r in server.requests if r.startswith("GET /org/tiny/resolve/"))
        served = len(server.requests)
        offline = load_in_subprocess(endpoint, hf_home, image, REPO, "org/never-fetched", offline=True)
        assert len(server.requests) == served                        # offline: not one request
    assert online[0]["text"] == expected
    snapshot = hf_home / "hub" / "models--org--tiny" / "snapshots" / SHA
    assert Path(online[0]["folder"]) == snapshot                     # huggingface_hub's own cache
    assert fetched == sorted(p.name for p in hub_folder.iterdir())  # safetensors, JSON, card only
    missing = online[1]["error"]
    assert missing.startswith("org/missing is not a local folder nor a model on the Hugging Face Hub "
                              f"({endpoint})") and "\n" not in missing
    assert online[2]["error"] == ("Hub model org/tiny has no revision 'nope'; pass an existing branch, "
                                  "tag or commit")
    assert offline[0]["text"] == expected and Path(offline[0]["folder"]) == snapshot
    assert offline[1]["error"] == (f"Hub model org/never-fetched is not in the Hugging Face cache "
                                   f"{hf_home / 'hub'} and HF_HUB_OFFLINE=1 forbids downloading it; "
                                   "download it once online or unset HF_HUB_OFFLINE")


def test_an_unreachable_hub_is_one_line_naming_the_repo(tmp_path, image):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (result,) = load_in_subprocess(f"http://127.0.0.1:{port}", tmp_path / "hf", image, REPO)
    assert result["error"].startswith(f"cannot download Hub model {REPO} from http://127.0.0.1:{port} "
                                      f"and it is not in the cache {tmp_path / 'hf' / 'hub'} (ConnectError: ")
    assert result["error"].endswith("); check the connection and try again")
    assert "\n" not in result["error"]


def test_without_huggingface_hub_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(AttncapError) as err:
        attncap.load("org/tiny")
    assert str(err.value) == ("org/tiny is not a local path; loading it from the Hugging Face Hub needs "
                              "the 'hub' extra: pip install 'attncap[hub]' (import of huggingface_hub "
                              "halted; None in sys.modules)")


def test_what_counts_as_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert hub.is_repo_id("org/name") and hub.is_repo_id("my-org/model.v2_1")
    assert not hub.is_repo_id("runs/demo")          # an existing folder is always local
    assert not hub.is_repo_id(Path("org/name"))     # a Path is a path
    assert not hub.is_repo_id("a/b/c") and not hub.is_repo_id("name") and not hub.is_repo_id("/abs/x")
