from tagmill.formats import open_reader
from tagmill.formats.base import SourceOptions
from tests import images
from tests.conftest import make_class_folders


def test_folder_per_class_lists_images_with_first_level_classes(class_folders):
    result = open_reader(str(class_folders)).read()
    assert result.task == "single"
    assert result.classes == ["cat", "dog", "owl"]
    by_id = {r.id: r for r in result.records}
    assert by_id["cat/000.jpg"].labels == ("cat",)
    # readers list; they do not decode, so broken files are still records here
    assert "cat/broken.jpg" in by_id
    reasons = {s.source.rsplit("/", 1)[-1]: s.reason for s in result.skipped}
    assert reasons == {"notes.txt": "not-an-image", "stray.jpg": "no-class"}


def test_nested_folders_use_the_first_level_unless_told(tmp_path):
    root = tmp_path / "data"
    images.write(root / "animals" / "cat" / "a.jpg", images.jpeg_bytes())
    images.write(root / "animals" / "dog" / "b.jpg", images.jpeg_bytes())
    images.write(root / "plants" / "fern" / "c.jpg", images.jpeg_bytes())
    first = open_reader(str(root)).read()
    assert sorted(r.labels[0] for r in first.records) == ["animals", "animals", "plants"]
    leaf = open_reader(str(root), SourceOptions(class_level=-1)).read()
    assert sorted(r.labels[0] for r in leaf.records) == ["cat", "dog", "fern"]
    second = open_reader(str(root), SourceOptions(class_level=2)).read()
    assert second.classes == ["cat", "dog", "fern"]


def test_train_val_folders_give_splits(tmp_path):
    make_class_folders(tmp_path / "d" / "train", {"a": 2, "b": 2})
    make_class_folders(tmp_path / "d" / "val", {"a": 1, "b": 1})
    result = open_reader(str(tmp_path / "d")).read()
    assert result.classes == ["a", "b"]
    splits = sorted((r.split, r.labels[0]) for r in result.records)
    assert splits.count(("val", "a")) == 1 and splits.count(("train", "b")) == 2
