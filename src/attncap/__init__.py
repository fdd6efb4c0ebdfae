"""attncap: attention-based image captioning (Show, Attend and Tell) in PyTorch."""

__version__ = "0.1.0"
