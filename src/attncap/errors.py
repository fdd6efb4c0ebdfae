"""The project's own error type (a user mistake, reported as one line by the CLI), and the check
that an optional extra (``attncap[serve]``, ``attncap[onnx]``...) is installed."""

import importlib


class AttncapError(ValueError):
    """A problem the user can fix; the message says what and where.

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    """


# What each optional extra of pyproject.toml brings, by import name (tests/test_extras.py checks
# that the two agree).
EXTRAS = {
    "serve": ("fastapi", "uvicorn", "python_multipart", "fastapi_offline"),
    "onnx": ("onnx", "onnxscript"),
    "tensorboard": ("tensorboard",),
    "hub": ("huggingface_hub",),
}


def require(extra: str, what: str) -> None:
    """Import the packages of an optional extra, or say in one line which extra to install.

    ``require("serve", "attncap serve")`` raises ``AttncapError("attncap serve needs the 'serve'
    extra: pip install 'attncap[serve]' (No module named 'fastapi')")`` when fastapi is missing.
    """
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise AttncapError(f"{what} needs the '{extra}' extra: pip install 'attncap[{extra}]' "
                               f"({exc})") from None
