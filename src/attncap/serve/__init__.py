"""Serving a trained model: HTTP API with micro-batching, a web page, and a uvicorn runner."""

from .app import CaptionOptions, ServeLimits, create_app
from .batching import MicroBatcher
from .server import background_server, bind, run_server

__all__ = ["CaptionOptions", "MicroBatcher", "ServeLimits", "background_server", "bind", "create_app",
           "run_server"]
