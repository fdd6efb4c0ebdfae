"""A lean install: the core trains and captions without the extras; serve and ONNX export say which
extra to install, in one line; pyproject's extras and attncap.errors.EXTRAS agree."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attncap.errors import EXTRAS
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("fastapi", "uvicorn", "multipart", "python_multipart", "fastapi_offline", "starlette",
            "onnx", "onnxruntime", "onnxscript", "tensorboard", "huggingface_hub")

# Runs `attncap ARGS` as a lean install would: one finder in front of the import system's own ones
# finds nothing for the extras' packages (so `import onnx` fails and importlib.util.find_spec("onnx")
# is None, as when it is not installed) and asks them for everything else.
LEAN = f"""
import sys
from importlib.abc import MetaPathFinder

class Lean(MetaPathFinder):
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self):
        for finder in self.finders:
            getattr(finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Lean(list(sys.meta_path))]
from attncap.cli import main
sys.exit(main(sys.argv[1:]))
"""


def attncap(*args: str, lean: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = LEAN if lean else "import sys\nfrom attncap.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def tiny_args(**train) -> list[str]:
    values = {**TINY, "train": {**TINY["train"], **train}}
    return [f"--set={section}.{k}={v}" for section, kv in values.items() for k, v in kv.items()]


def test_help_needs_no_extra():
    for args in (["--help"], ["demo", "--help"], ["serve", "--help"], ["export", "--help"]):
        result = attncap(*args)
        assert result.returncode == 0, result.stderr
        assert "usage: attncap" in result.stdout and not result.stderr


def test_cli_imports_no_extra_until_asked():
    probe = ("import sys\nimport attncap, attncap.cli\nattncap.cli.build_parser()\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r} "
             "or m == 'torch.utils.tensorboard'))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_serve_without_its_extra_says_which_one(tmp_path):
    result = attncap("serve", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert "attncap serve needs the 'serve' extra: pip install 'attncap[serve]'" in result.stderr


def test_train_caption_without_extras_and_onnx_says_which_one(run_copy):
    run = str(run_copy)
    trained = attncap("train", "--run", run, "--quiet", *tiny_args(epochs=1))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "trained 1 epochs" in trained.stdout
    assert trained.stdout.count("pip install 'attncap[tensorboard]'") == 1  # one note, not one per epoch
    assert (run_copy / "train" / "metrics.jsonl").stat().st_size > 0
    assert not (run_copy / "train" / "tb").exists()

    image = run_copy / "dataset" / "images" / "shapes_000001.jpg"
    captioned = attncap("caption", "--run", run, str(image), "--quiet")
    assert captioned.returncode == 0, captioned.stderr[-2000:]
    assert captioned.stdout.startswith(f"{image}: ") and len(captioned.stdout.split()) > 2

    exported = attncap("export", run, "--format", "onnx")
    assert exported.returncode == 2 and exported.stdout == ""
    assert len(exported.stderr.splitlines()) == 1, exported.stderr
    assert ("attncap export --format onnx needs the 'onnx' extra: pip install 'attncap[onnx]'"
            in exported.stderr)
    assert not (run_copy / "export").exists()


def _name(requirement: str) -> str:
    """The distribution a requirement names, normalised: 'Fastapi_Offline>=1.7' -> 'fastapi-offline'."""
    return re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_core_has_no_extra_and_all_has_every_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = {_name(r) for r in project["dependencies"]}
    optional = {_name(r) for extra, reqs in extras.items() if extra not in ("all", "test") for r in reqs}
    assert optional and not core & optional
    (everything,) = extras["all"]
    listed = set(re.fullmatch(r"attncap\[(.*)\]", everything).group(1).split(","))
    assert listed == set(extras) - {"all", "test"}
    # What require() imports for an extra comes from that extra's packages.
    assert set(EXTRAS) <= listed
    providers = importlib.metadata.packages_distributions()
    for extra, modules in EXTRAS.items():
        names = {_name(r) for r in extras[extra]}
        for module in modules:
            assert {_name(d) for d in providers[module]} & names, (extra, module)
