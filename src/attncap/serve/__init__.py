"""Serving a trained model: HTTP API with micro-batching, a web page, and a uvicorn runner.

Needs the ``serve`` extra (``pip install 'attncap[serve]'``); without it, importing this package
raises a one-line :class:`~attncap.errors.AttncapError` that says so.
"""

from ..errors import require

require("serve", "attncap serve")

from .admission import DecodePool, MemoryBudget
from .app import CaptionOptions, ServeLimits, begin_shutdown, create_app
from .batching import MicroBatcher
from .server import background_server, bind, run_server

__all__ = ["CaptionOptions", "DecodePool", "MemoryBudget", "MicroBatcher", "ServeLimits",
           "background_server", "begin_shutdown", "bind", "create_app", "run_server"]
