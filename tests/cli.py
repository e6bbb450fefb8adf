"""Running the tagmill CLI in-process from tests, and a tiny training that takes seconds."""

from __future__ import annotations

from typer.testing import CliRunner

from tagmill.cli import app

runner = CliRunner()
#: a real network, small and untrained, on 48-px inputs: a whole run takes seconds
TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "48", "--batch-size", "8",
        "--workers", "0", "--frozen-epochs", "0", "--epochs", "2", "--lr", "0.02"]


def run(*args: str, code: int = 0):
    """``tagmill ARGS``; fails the test unless it exits with ``code``."""
    # wide enough that rich never folds a long temporary path inside a table cell
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "300"})
    assert result.exit_code == code, result.output
    return result
