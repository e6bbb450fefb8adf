"""``import tagmill``: the notebook API, its ``__all__``, and the README's example run as written."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import types
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tagmill
from tagmill.errors import InputError, StorageError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(backbone="test_efficientnet", pretrained=False, image_size=48, batch_size=8, workers=0, lr=0.02,
            frozen_epochs=1, cache_views=1)


def test_every_name_in_all_is_importable_and_documented():
    for name in tagmill.__all__:
        value = getattr(tagmill, name)
        if name != "__version__":
            assert (value.__doc__ or "").strip(), f"tagmill.{name} has no docstring"
        assert name in dir(tagmill)


def test_all_is_sorted_and_nothing_public_is_missing():
    """httpx's test: __all__ lists exactly the public names (submodules aside)."""
    for name in tagmill.__all__:
        getattr(tagmill, name)  # the lazy names land in the module's namespace
    public = sorted(
        (name for name, value in vars(tagmill).items() if not name.startswith("_") and not isinstance(value, types.ModuleType)),
        key=str.casefold,
    )
    assert tagmill.__all__ == sorted(tagmill.__all__, key=str.casefold)
    assert [n for n in tagmill.__all__ if n != "__version__"] == public


def test_importing_tagmill_stays_fast():
    code = ("import sys, tagmill; tagmill.train_model; tagmill.load_bundle; "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'typer') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'trian_model'"):
        tagmill.trian_model  # noqa: B018


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    section = section[: section.index("\n## ", 1)]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_readme_notebook_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")  # "run from the repository's root"
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__notebook__"})
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("['ankle-boot', 'bag'")
    assert lines[1].startswith("accuracy ") and float(lines[1].split()[1]) > 0.5  # chance is 0.1
    assert lines[3] == "['ankle-boot']"
    assert lines[-1] == "[['ankle-boot'], ['ankle-boot']]"
    assert json.loads((tmp_path / "bundles" / "fashion" / "model.json").read_text())["classes"][0] == "ankle-boot"
    assert (tmp_path / "runs" / "fashion" / "eval-val" / "report.md").exists()


@pytest.fixture(scope="module")
def bundle(colour_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    result = tagmill.train_model(colour_dataset, root / "run", progress=False, **TINY)
    assert result.history and (root / "run" / "report.md").exists()
    meta = tagmill.export_bundle(root / "run", root / "bundle")
    assert meta.classes == ("blue", "green", "red")
    return root / "bundle"


def test_a_loaded_bundle_predicts_on_images_arrays_paths_and_bytes(bundle, tmp_path):
    model = tagmill.load_bundle(bundle)
    assert isinstance(model, tagmill.Predictor)
    red = np.zeros((40, 40, 3), dtype=np.uint8)
    red[..., 0] = 200
    path = tmp_path / "red.png"
    Image.fromarray(red).save(path)
    one = model.predict(Image.fromarray(red))
    assert isinstance(one, tagmill.Prediction) and one.ok
    same = [model.predict(red), model.predict(red / 255.0), model.predict(str(path)), model.predict(path),
            model.predict(path.read_bytes())]
    assert all(p.probabilities == pytest.approx(one.probabilities, abs=1e-5) for p in same)
    grey = model.predict(np.full((40, 40), 0.5, dtype=np.float32))
    assert grey.ok and len(grey.probabilities) == 3
    many = model.predict([red, path, b"not an image"], top_k=2)
    assert [p.ok for p in many] == [True, True, False] and len(many[0].top) == 2
    with pytest.raises(InputError, match="cannot predict on a dict"):
        model.predict({"image": red})
    assert not model.predict(np.zeros((4, 4, 5), dtype=np.uint8)).ok
    with pytest.raises(StorageError):
        model.predict(tmp_path / "missing.png")


def test_evaluate_and_resume_through_the_api(bundle, colour_dataset, tmp_path):
    result = tagmill.evaluate_model(bundle, colour_dataset, out=tmp_path / "eval", progress=False)
    assert 0 <= result.headline["accuracy"] <= 1 and (tmp_path / "eval" / "report.md").exists()
    resumed = tagmill.train_model(None, bundle.parent / "run", resume=True, progress=False)
    assert len(resumed.history) == 1


def test_options_are_checked_as_on_the_command_line(colour_dataset, tmp_path):
    with pytest.raises(InputError, match="learning_rate"):
        tagmill.train_model(colour_dataset, tmp_path / "run", progress=False, learning_rate=0.1)
    with pytest.raises(InputError, match="time-budget"):
        tagmill.train_model(colour_dataset, tmp_path / "run", progress=False, time_budget="soon")
    with pytest.raises(InputError, match="valfraction"):
        tagmill.import_dataset(tmp_path, tmp_path / "ds", progress=False, valfraction=0.2)
    with pytest.raises(InputError, match="resume=True takes the run directory only"):
        tagmill.train_model(colour_dataset, tmp_path / "run", resume=True, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "ds").exists()
    assert os.listdir(tmp_path) == []


def test_diagnose_dataset_returns_the_findings_and_writes_the_report(colour_dataset, tmp_path):
    found = tagmill.diagnose_dataset(colour_dataset, tmp_path / "doctor", progress=False)
    counts = found.counts()
    assert counts["images"] == len(found.facts) == 60
    assert {f.split for f in found.facts} == {"train", "val"}
    summary = json.loads((tmp_path / "doctor" / "doctor.json").read_text())
    assert summary["counts"] == json.loads(json.dumps(counts))
