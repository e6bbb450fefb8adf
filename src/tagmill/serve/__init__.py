"""Serving a model bundle over HTTP: SageMaker's contract, tagmill's routes, a web page.

    from tagmill.serve import ServeConfig, create_app, run_server
    run_server(ServeConfig("bundle/", port=8080, workers=2))
"""

from tagmill.serve.app import create_app
from tagmill.serve.config import ServeConfig
from tagmill.serve.server import run_server

__all__ = ["ServeConfig", "create_app", "run_server"]
