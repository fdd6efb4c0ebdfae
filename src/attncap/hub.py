"""Models shared the usual way: a Hugging Face Hub model repository.

* :func:`write_hub_files` adds to an exported model folder what a Hub repository shows and needs:
  the model card's YAML front matter (``library_name: attncap``, ``pipeline_tag: image-to-text``),
  the run's exact training config (``training_config.json``) and the commands that made and load
  it. ``attncap export RUN --format hub --out DIR`` writes such a folder; ``hf upload ORG/NAME DIR``
  publishes it.
* :func:`download` fetches one with ``huggingface_hub.snapshot_download`` (an optional dependency:
  ``pip install 'attncap[hub]'``) into its usual cache, so ``HF_HOME``, ``HF_HUB_CACHE``,
  ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE=1`` work as for every other library.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from . import __version__
from . import config as config_lib
from .errors import AttncapError, require
from .files import write_json
from .predict import Predictor

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TRAINING_CONFIG = "training_config.json"
PATTERNS = ["*.safetensors", "*.json", "*.md"]  # all a model folder holds; nothing else is fetched
TAGS = ("image-to-text", "image-captioning", "show-attend-and-tell", "attncap")


def is_repo_id(source: object) -> bool:
    """True for a string like ``"org/name"`` that is not an existing local path."""
    return isinstance(source, str) and bool(REPO_ID.match(source)) and not os.path.exists(source)


def download(repo_id: str, revision: str | None = None,
             cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of Hub model ``repo_id`` (fetched, or from the cache when current or offline).

    Raises :class:`AttncapError` (one line naming the repo) when huggingface_hub is missing, the
    repo or revision does not exist, or it can neither be downloaded nor found in the cache.
    """
    require("hub", f"{repo_id} is not a local path; loading it from the Hugging Face Hub")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    at = f" at revision {revision}" if revision else ""
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=PATTERNS,
            library_name="attncap", library_version=__version__)
    except RepositoryNotFoundError:
        raise AttncapError(f"{repo_id} is not a local folder nor a model on the Hugging Face Hub "
                           f"({endpoint}); check the path or repo id (or log in with `hf auth login` "
                           "if it is private)") from None
    except RevisionNotFoundError:
        raise AttncapError(f"Hub model {repo_id} has no revision {revision!r}; pass an existing branch, "
                           "tag or commit") from None
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise AttncapError(f"Hub model {repo_id}{at} is not in the Hugging Face cache {cache} and "
                               "HF_HUB_OFFLINE=1 forbids downloading it; download it once online or "
                               "unset HF_HUB_OFFLINE") from None
        raise AttncapError(f"cannot download Hub model {repo_id}{at} from {endpoint} and it is not in "
                           f"the cache {cache} ({_first_line(exc)}); check the connection and try again"
                           ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise AttncapError(f"cannot download Hub model {repo_id}{at} from {endpoint}: "
                           f"{_first_line(exc)}") from None
    return Path(folder)


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of huggingface_hub's (often multi-line) message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].removeprefix("Got: ")[:240] if lines else type(exc).__name__


def write_hub_files(folder: Path, source: Path, predictor: Predictor, card: str) -> str:
    """Write ``training_config.json`` into the export ``folder``; return the Hub model card.

    ``source``: what was exported (a run directory's own ``config.json`` is copied byte for byte;
    otherwise the checkpoint's config is written). ``card``: the folder export's card, kept below
    the front matter and followed by the training config and the commands.
    """
    run_config = source / "config.json"
    if (source / "checkpoints").is_dir() and run_config.is_file():
        shutil.copyfile(run_config, folder / TRAINING_CONFIG)
        os.chmod(folder / TRAINING_CONFIG, 0o644)
    else:
        write_json(folder / TRAINING_CONFIG, config_lib.to_dict(predictor.cfg))
    config_text = (folder / TRAINING_CONFIG).read_text(encoding="utf-8")
    return front_matter(predictor) + card + _hub_sections(predictor, config_text)


def front_matter(predictor: Predictor) -> str:
    """The YAML block the Hub reads for the model page: library, task, tags (and the dataset)."""
    tags = "\n".join(f"- {t}" for t in TAGS)
    dataset = "datasets:\n- coco\n" if predictor.cfg.data.dataset == "coco" else ""
    return f"---\nlibrary_name: attncap\npipeline_tag: image-to-text\ntags:\n{tags}\n{dataset}---\n\n"


def _commands(predictor: Predictor) -> str:
    """The commands that make this model and publish it (as far as a config can tell)."""
    beam = predictor.cfg.decode.beam_size
    if predictor.info["name"] == "resnet101_sgrvinod":
        made = ("attncap import sgrvinod BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \\\n"
                "    WORDMAP_coco_5_cap_per_img_5_min_word_freq.json --out models/sgrvinod\n"
                "attncap export models/sgrvinod --format hub --out DIR\n")
    else:
        data = "attncap data coco2014 --root DATA   # the images and captions named in the config\n" \
            if predictor.cfg.data.dataset == "coco" else ""
        made = (f"{data}attncap prepare  --run runs/NAME --config {TRAINING_CONFIG}\n"
                "attncap features --run runs/NAME\nattncap train    --run runs/NAME\n"
                f"attncap evaluate --run runs/NAME --beam {beam}\n"
                "attncap export   runs/NAME --format hub --out DIR\n")
    return made + "hf upload ORG/NAME DIR              # huggingface_hub's CLI\n"


def _hub_sections(predictor: Predictor, config_text: str) -> str:
    shown = json.dumps(json.loads(config_text), indent=2)
    return f"""
## Load from the Hub

```python
import attncap

captioner = attncap.load("ORG/NAME")   # this repository's id; cached by huggingface_hub
print(captioner("picture.jpg").text)
```

(`pip install 'attncap[hub]'`; with `HF_HUB_OFFLINE=1` the cached copy is used.)

## Training config

`{TRAINING_CONFIG}` is the run's config exactly as trained:

```json
{shown}
```

## Commands

```sh
{_commands(predictor)}```
"""
