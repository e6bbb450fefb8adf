"""A real S3 endpoint for the s3:// tests: moto's server, on loopback, in a subprocess.

One server per test session (per xdist worker); every test gets its own fresh bucket
and an environment that points botocore at the server with dummy credentials, and
away from any AWS config on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tagmill import storage

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: Variables that would point botocore elsewhere on a developer's machine.
CLEARED_ENV = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION",
    "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, released, and not reused at once)."""
    return free_port()


@dataclass
class MotoServer:
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path


def start_moto(log: Path, extra_env: dict[str, str] | None = None) -> MotoServer:
    """Start ``moto_server`` on a free 127.0.0.1 port and wait until it accepts connections.

    Readiness is probed with a bare TCP connect, not a request: a server that checks
    credentials after N requests (INITIAL_NO_AUTH_ACTION_COUNT) must not count probes.
    """
    executable = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if executable is None:
        pytest.fail("moto_server is not installed: run `make install` (moto[server] is a dev dependency)")
    port = free_port()
    env = {**os.environ, **DUMMY_ENV, **(extra_env or {})}
    handle = log.open("wb")
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)], stdout=handle, stderr=subprocess.STDOUT, env=env
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"moto_server exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return MotoServer(f"http://127.0.0.1:{port}", process, log)
        time.sleep(0.05)
    process.kill()
    pytest.fail("moto_server did not start listening within 30 s")


def stop_moto(server: MotoServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = start_moto(tmp_path_factory.mktemp("moto") / "server.log")
    yield server
    stop_moto(server)


def point_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, config_dir: Path) -> None:
    """Aim botocore (boto3, s3fs, tagmill subprocesses) at ``endpoint`` with dummy keys."""
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # no ~/.aws of this machine: its profile could add credentials or retry settings
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_dir / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(config_dir / "credentials"))


@pytest.fixture(autouse=True)
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Every test here talks to the moto server, with no --storage-option left over."""
    point_at(monkeypatch, moto_server.endpoint, tmp_path_factory.getbasetemp())
    storage.set_storage_options({})
    yield moto_server.endpoint
    storage.set_storage_options({})


def s3_client(endpoint: str | None = None, **credentials: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint or os.environ["AWS_ENDPOINT_URL"], **credentials)


def new_bucket(client=None) -> str:
    """A fresh, uniquely named bucket: tests never see each other's objects."""
    name = f"tagmill-{uuid.uuid4().hex[:16]}"
    (client or s3_client()).create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(s3_env: str) -> str:
    return new_bucket()


def upload_tree(local: Path, bucket: str, prefix: str) -> None:
    """Upload every file under ``local`` to s3://bucket/prefix/... with boto3."""
    client = s3_client()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


@dataclass
class AuthServer:
    """A second moto server that checks credentials (IAM), with two users in it."""

    endpoint: str
    bucket: str
    allowed: dict[str, str]  #: key/secret of a user allowed s3:* everywhere
    denied: dict[str, str]  #: key/secret of a user with no permissions at all


# Requests the set-up below makes before moto starts checking credentials.
_AUTH_SETUP_ACTIONS = 5


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """moto checks credentials only after INITIAL_NO_AUTH_ACTION_COUNT requests: the
    first five create the users; from then on every request is authenticated."""
    import boto3

    server = start_moto(tmp_path_factory.mktemp("moto-auth") / "server.log",
                        {"INITIAL_NO_AUTH_ACTION_COUNT": str(_AUTH_SETUP_ACTIONS)})
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1", **_dummy_keys())
        iam.create_user(UserName="allowed")  # 1
        iam.put_user_policy(UserName="allowed", PolicyName="s3", PolicyDocument=json.dumps(  # 2
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        allowed = iam.create_access_key(UserName="allowed")["AccessKey"]  # 3
        iam.create_user(UserName="denied")  # 4
        denied = iam.create_access_key(UserName="denied")["AccessKey"]  # 5
        allowed_keys = {"key": allowed["AccessKeyId"], "secret": allowed["SecretAccessKey"]}
        denied_keys = {"key": denied["AccessKeyId"], "secret": denied["SecretAccessKey"]}
        client = s3_client(server.endpoint, aws_access_key_id=allowed_keys["key"],
                           aws_secret_access_key=allowed_keys["secret"], region_name="us-east-1")
        bucket = new_bucket(client)
        client.put_object(Bucket=bucket, Key="ds/dataset.json", Body=b"{}")
        yield AuthServer(server.endpoint, bucket, allowed_keys, denied_keys)
    finally:
        stop_moto(server)


def _dummy_keys() -> dict[str, str]:
    return {"aws_access_key_id": DUMMY_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]}
