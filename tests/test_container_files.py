"""The image's files, checked without building it (tests/container builds and runs it):
the Dockerfile pins what pyproject.toml pins, the build context leaves the work tree's
bulk out, and the entrypoint hands SageMaker's verbs to the real command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.serve.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


def test_the_dockerfile_pins_torch_as_the_project_does() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pinned = re.search(rf'"{package}==([^"]+)"', pyproject).group(1)
        assert re.search(rf"^ARG {arg}=(\S+)$", dockerfile, re.M).group(1) == pinned


def test_the_build_context_is_the_package_only() -> None:
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # everything out (.venv, runs/, test artefacts) ...
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", (REPO / "Dockerfile").read_text(), re.M))
    # ... but what the Dockerfile copies
    assert {part.split("/")[0] for line in copied for part in line.split()} <= kept


def entrypoint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(REPO / "container" / "entrypoint.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}, timeout=120)


def test_the_entrypoint_runs_sagemaker_verbs_and_any_command(tmp_path: Path) -> None:
    (tmp_path / "input" / "data").mkdir(parents=True)

    train = entrypoint("train", "--root", str(tmp_path))
    serve = entrypoint("serve", "--root", str(tmp_path))
    plain = entrypoint("tagmill", "--version")

    assert train.returncode == 2
    assert "the job has no 'train' channel" in (tmp_path / "output" / "failure").read_text()
    assert serve.returncode == 2 and "no model bundle in" in serve.stderr
    assert plain.returncode == 0 and plain.stdout.startswith("tagmill ")


def test_the_healthcheck_fails_while_nothing_answers_ping() -> None:
    result = subprocess.run([sys.executable, str(REPO / "container" / "healthcheck.py")],
                            env={**os.environ, "SAGEMAKER_BIND_TO_PORT": str(free_port())}, timeout=30)
    assert result.returncode == 1
