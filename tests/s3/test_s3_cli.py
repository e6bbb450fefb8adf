"""The whole job through the CLI with every path on S3 (moto's server on loopback)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from tagmill.bundle import load_bundle
from tagmill.cli import app
from tagmill.dataset.manifest import load_manifest, verify_shards
from tagmill.errors import DatasetError, StorageError
from tests import images
from tests.conftest import make_colour_classes
from tests.s3.conftest import AuthServer, closed_port, s3_client, upload_tree

runner = CliRunner()
TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "48", "--batch-size", "8",
        "--workers", "0", "--frozen-epochs", "1", "--epochs", "1"]


def run(*args: str, code: int = 0) -> str:
    """The command's output (stdout and stderr), whitespace collapsed: rich folds long
    lines at the console width, which is not always the COLUMNS asked for here."""
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "300"})
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def keys(bucket: str, prefix: str) -> set[str]:
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return {item["Key"][len(prefix) + 1:] for item in listing.get("Contents", [])}


def test_import_inspect_train_export_predict_all_on_s3(bucket, tmp_path):
    make_colour_classes(tmp_path / "photos", 12)
    upload_tree(tmp_path / "photos", bucket, "photos")
    s3 = f"s3://{bucket}"

    imported = run("import", f"{s3}/photos", "--out", f"{s3}/ds", "--val-fraction", "0.25")
    assert f"imported 36 images from folder per class (3 classes) → {s3}/ds" in imported
    manifest = load_manifest(f"{s3}/ds")
    verify_shards(f"{s3}/ds", manifest)
    assert manifest.classes == ["blue", "green", "red"] and {"dataset.json", "train-000000.tar"} <= keys(bucket, "ds")

    inspected = run("inspect", f"{s3}/ds", "--no-sheet")
    assert f"{s3}/ds: single-label, 3 classes, 36 images (train 27, val 9)" in inspected

    trained = run("train", f"{s3}/ds", "--out", f"{s3}/runs/r1", *TINY)
    assert f"run in {s3}/runs/r1" in trained
    assert {"best.pt", "metrics.json", "report.md", "config.json"} <= keys(bucket, "runs/r1")

    run("export", f"{s3}/runs/r1", "--out", f"{s3}/bundle")
    _, meta = load_bundle(f"{s3}/bundle")
    assert meta.classes == ("blue", "green", "red") and meta.architecture == "test_efficientnet"

    local_png = tmp_path / "photos" / "red" / "000.png"
    predicted = run("predict", f"{s3}/bundle", str(local_png), f"{s3}/photos/blue/001.png",
                    "--json", f"{s3}/predictions.json")
    assert "2 predictions" in predicted
    rows = json.loads(s3_client().get_object(Bucket=bucket, Key="predictions.json")["Body"].read())
    assert [Path(row["input"]).name for row in rows] == ["000.png", "001.png"]
    assert all(not row["error"] and abs(sum(row["probabilities"]) - 1) < 1e-5 for row in rows)


def test_training_from_s3_fills_the_local_shard_cache(bucket, tmp_path):
    make_colour_classes(tmp_path / "photos", 8)
    upload_tree(tmp_path / "photos", bucket, "photos")
    s3 = f"s3://{bucket}"
    run("import", f"{s3}/photos", "--out", f"{s3}/ds", "--val-fraction", "0.25", "--shard-size-mb", "1")
    cache = tmp_path / "shard-cache"
    run("train", f"{s3}/ds", "--out", f"{s3}/runs/cached", *TINY, "--cache-dir", str(cache), "--cache-gb", "0.1")
    manifest = load_manifest(f"{s3}/ds")
    expected = {f"{shard.sha256}.tar" for info in manifest.splits.values() for shard in info.shards}
    assert {p.name for p in cache.glob("*.tar")} == expected


def test_csv_source_with_images_on_s3(bucket, tmp_path):
    lines = ["id,label"]
    for i in range(12):
        name = ("cat", "dog")[i % 2]
        images.write(tmp_path / "imgs" / f"{i}.jpg", images.jpeg_bytes(seed=i))
        lines.append(f"{i},{name}")
    s3_client().put_object(Bucket=bucket, Key="labels.csv", Body=("\n".join(lines) + "\n").encode())
    upload_tree(tmp_path / "imgs", bucket, "imgs")
    s3 = f"s3://{bucket}"
    run("import", f"{s3}/labels.csv", "--images", f"{s3}/imgs", "--suffix", ".jpg", "--out", f"{s3}/ds")
    manifest = load_manifest(f"{s3}/ds")
    assert manifest.classes == ["cat", "dog"] and manifest.report["imported"] == 12
    assert "2 classes, 12 images" in run("inspect", f"{s3}/ds", "--no-sheet")


def test_missing_bucket_or_dataset_is_a_clear_error(bucket):
    gone = f"s3://no-such-{bucket}"
    inspected = run("inspect", f"{gone}/ds", "--no-sheet", code=StorageError.exit_code)
    assert f"error: {gone}/ds/dataset.json: bucket does not exist" in inspected
    assert "Traceback" not in inspected
    imported = run("import", f"{gone}/photos", "--out", f"s3://{bucket}/ds", code=StorageError.exit_code)
    assert f"{gone}/photos: bucket does not exist" in imported
    written = run("train", f"{gone}/ds", "--out", f"s3://{bucket}/r", *TINY, code=StorageError.exit_code)
    assert "bucket does not exist" in written
    # the bucket is there, the dataset is not: the same answer as for a local folder
    missing = run("inspect", f"s3://{bucket}/nothing", "--no-sheet", code=DatasetError.exit_code)
    assert f"s3://{bucket}/nothing is not a tagmill dataset: it has no dataset.json" in missing


def test_unreachable_endpoint_and_storage_option_endpoint(moto_server, bucket, tmp_path, monkeypatch):
    make_colour_classes(tmp_path / "photos", 4, classes=("red", "blue"))
    upload_tree(tmp_path / "photos", bucket, "photos")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    failed = run("inspect", f"s3://{bucket}/ds", "--no-sheet", code=StorageError.exit_code)
    assert re.search(rf"error: s3://{bucket}/ds/dataset.json: cannot connect to http://127\.0\.0\.1:\d+", failed)
    assert "Traceback" not in failed
    # --storage-option endpoint_url=... wins over the environment
    option = ["--storage-option", f"endpoint_url={moto_server.endpoint}"]
    run(*option, "import", f"s3://{bucket}/photos", "--out", f"s3://{bucket}/ds", "--workers", "1")
    assert "2 classes, 8 images" in run(*option, "inspect", f"s3://{bucket}/ds", "--no-sheet")


def test_bad_credentials_through_the_cli(auth_server: AuthServer):
    location = f"s3://{auth_server.bucket}/ds"
    endpoint = ["--storage-option", f"endpoint_url={auth_server.endpoint}"]
    wrong = ["--storage-option", f"key={auth_server.allowed['key']}", "--storage-option", "secret=wrong"]
    result = run(*endpoint, *wrong, "inspect", location, "--no-sheet", code=StorageError.exit_code)
    assert f"error: {location}/dataset.json: the secret key does not match the access key id" in result
    denied = [f"--storage-option=key={auth_server.denied['key']}", f"--storage-option=secret={auth_server.denied['secret']}"]
    result = run(*endpoint, *denied, "inspect", location, "--no-sheet", code=StorageError.exit_code)
    assert f"error: {location}/dataset.json: access denied" in result
