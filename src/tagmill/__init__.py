"""tagmill: self-hosted image classification, from labelled images to a live service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tagmill")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
