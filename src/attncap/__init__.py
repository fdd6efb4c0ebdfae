"""attncap: attention-based image captioning (Show, Attend and Tell) in PyTorch."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # imported lazily below, so that `import attncap` stays cheap
    from .api import Caption, ImageCaptioner


def load(source: str | os.PathLike, device: str | None = None, *, batch_size: int = 16,
         revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> ImageCaptioner:
    """A ready captioner from a run directory, a checkpoint folder, an exported model folder or a
    Hugging Face Hub repo id ``"org/name"``: ``cap = attncap.load(path); cap("photo.jpg").text``.

    ``batch_size``: images per encoder and beam-search batch; ``revision`` and ``cache_dir``: for a
    Hub repo (see :func:`attncap.api.load`). :class:`attncap.api.ImageCaptioner` says what it is
    called on and returns. Weights are read from safetensors and JSON only, never unpickled.
    """
    from .api import load as _load

    return _load(source, device, batch_size=batch_size, revision=revision, cache_dir=cache_dir)


def __getattr__(name: str) -> object:
    if name in ("Caption", "ImageCaptioner"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'attncap' has no attribute {name!r}")
