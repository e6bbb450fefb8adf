"""Serving a model bundle over HTTP: SageMaker's contract, tagmill's routes, a web page.

    from tagmill.serve import ServeConfig, create_app, run_server
    run_server(ServeConfig("bundle/", port=8080, workers=2))
"""

from __future__ import annotations

from typing import Any

from tagmill.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run_server"]


def __getattr__(name: str) -> Any:
    # imported on first use: the app pulls in torch and the model stack, which the
    # supervisor of several workers (``python -m tagmill.serve``) must not hold
    if name == "create_app":
        from tagmill.serve.app import create_app

        return create_app
    if name == "run_server":
        from tagmill.serve.server import run_server

        return run_server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
