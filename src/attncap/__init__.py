"""attncap: attention-based image captioning (Show, Attend and Tell) in PyTorch."""

__version__ = "0.1.0"


def load(path, device: str | None = None):
    """A ready captioner from a run directory, a checkpoint folder or an exported model folder.

    Returns an :class:`attncap.predict.Predictor`: ``load(path).caption([pil_image])``. Weights are
    read from safetensors and JSON only, never unpickled. (Imported lazily so that ``import attncap``
    stays cheap.)
    """
    from .predict import Predictor, resolve_model_dir

    return Predictor(resolve_model_dir(path), device)
