"""The import half of each user job, end to end with one `tagmill import` command.

Each test builds a small copy of a real user's data layout (real images, the same
file formats and column names) and checks the packed dataset that comes out.
"""

from __future__ import annotations

import csv
from pathlib import Path

from typer.testing import CliRunner

from tagmill.cli import app
from tagmill.dataset.manifest import load_manifest, verify_shards
from tagmill.dataset.shards import iter_shard
from tests import images
from tests.mxnet_pack import write_pack

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def all_samples(dataset: Path, split: str):
    manifest = load_manifest(str(dataset))
    return [s for shard in manifest.split(split).shards for s in iter_shard(str(dataset / shard.name))]


GENRES = [
    "Thriller|Crime", "Thriller|Crime|Drama", "Crime|Thriller|Mystery", "Thriller|Crime|Romance",
    "Comedy|Crime|Thriller", "Drama", "Comedy|Romance", "Animation|Adventure|Comedy", "Horror",
    "Thriller", "Crime|Drama", "Documentary",
]


def test_thriller_posters_rule_and_balance(tmp_path):
    """The thriller job: multi-genre posters -> 'Thriller AND Crime AND NOT Romance AND NOT Comedy', balanced."""
    posters = tmp_path / "posters"
    rows = []
    for i in range(120):
        genre = GENRES[i % len(GENRES)]
        images.write(posters / f"{1000 + i}.jpg", images.jpeg_bytes(60, 90, seed=i))
        rows.append({"imdbId": str(1000 + i), "Title": f"Movie {i}", "Genre": genre})
    with open(tmp_path / "MovieGenre.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["imdbId", "Title", "Genre"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "thriller"
    result = run(
        "import", str(tmp_path / "MovieGenre.csv"), "--images", str(posters), "--suffix", ".jpg",
        "--id-column", "imdbId", "--label-column", "Genre",
        "--derive", "thriller = Thriller AND Crime AND NOT Romance AND NOT Comedy",
        "--balance", "--seed", "3", "--out", str(out),
    )
    manifest = load_manifest(str(out))
    verify_shards(str(out), manifest)
    assert manifest.task == "single" and manifest.classes == ["other", "thriller"]
    positives = sum(1 for i in range(120) if GENRES[i % len(GENRES)] in GENRES[:3])  # 3 of 12 genre sets qualify
    totals = {c: sum(info.class_counts[c] for info in manifest.splits.values()) for c in manifest.classes}
    assert totals == {"other": positives, "thriller": positives}
    assert "balance" in result.output
    for sample in all_samples(out, "train"):
        genres = set(GENRES[(int(sample.meta["id"]) - 1000) % len(GENRES)].split("|"))
        expected = "thriller" if {"Thriller", "Crime"} <= genres and not genres & {"Romance", "Comedy"} else "other"
        assert sample.meta["labels"] == [expected]


def test_movie_stills_tags_csv(tmp_path):
    """The movie-stills job: `id, shot_image_id, tags` with comma-separated tags; untagged stills kept."""
    stills = tmp_path / "stills"
    tag_sets = ["statue", "bed, legs, text", "hand, text", "castle, sky", "water, redhead", ""]
    lines = ["id,shot_image_id,tags"]
    for i in range(60):
        shot = 80000 + i
        images.write(stills / f"{shot}.jpg", images.jpeg_bytes(64, 36, seed=i))
        lines.append(f'{i + 1},{shot},"{tag_sets[i % len(tag_sets)]}"')
    (tmp_path / "stills.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    result = run(
        "import", str(tmp_path / "stills.csv"), "--images", str(stills), "--id-column", "shot_image_id",
        "--label-column", "tags", "--suffix", ".jpg", "--out", str(out),
    )
    manifest = load_manifest(str(out))
    assert manifest.task == "multi"
    assert manifest.classes == sorted(["statue", "bed", "legs", "text", "hand", "castle", "sky", "water", "redhead"])
    untagged = sum(info.untagged for info in manifest.splits.values())
    assert untagged == 10 and manifest.report["untagged"] == 10
    assert "10 images with no tag" in result.output
    for tag in manifest.classes:  # iterative stratification: every tag on both sides
        assert manifest.split("train").class_counts[tag] > 0 and manifest.split("val").class_counts[tag] > 0
    skipped = tmp_path / "ds2"
    run("import", str(tmp_path / "stills.csv"), "--images", str(stills), "--id-column", "shot_image_id",
        "--label-column", "tags", "--suffix", ".jpg", "--skip-untagged", "--out", str(skipped))
    assert load_manifest(str(skipped)).report["imported"] == 50


def make_caltech(root: Path, classes: list[str], per_class: int) -> list[tuple[int, int, str]]:
    entries = []
    for label, name in enumerate(classes):
        for i in range(per_class):
            rel = f"{label + 1:03d}.{name}/{label + 1:03d}_{i:04d}.jpg"
            images.write(root / rel, images.jpeg_bytes(50, 40, seed=label * 100 + i))
            entries.append((len(entries), label, rel))
    return entries


def write_lst(path: Path, entries) -> Path:
    path.write_text("".join(f"{index}\t{float(label):.6f}\t{rel}\n" for index, label, rel in entries))
    return path


def test_caltech_lst_train_and_val(tmp_path):
    """The Caltech-256 job: train.lst + val.lst (index TAB float label TAB path), class names from folders."""
    root = tmp_path / "256_ObjectCategories"
    entries = make_caltech(root, ["ak47", "american-flag", "backpack"], 8)
    train = write_lst(tmp_path / "caltech-256-train.lst", [e for e in entries if e[0] % 4])
    val = write_lst(tmp_path / "caltech-256-val.lst", [e for e in entries if not e[0] % 4])
    out = tmp_path / "caltech"
    run("import", str(train), "--val-from", str(val), "--root", str(root), "--out", str(out))
    manifest = load_manifest(str(out))
    assert manifest.classes == ["001.ak47", "002.american-flag", "003.backpack"]
    assert manifest.split("val").count == 6 and manifest.split("train").count == 18


def test_recordio_packs_with_class_names(tmp_path):
    """The thriller and Caltech-256 jobs: im2rec packs (train .rec/.idx + valid .rec), no MXNet needed."""
    def items(start: int, n: int):
        for key in range(start, start + n):
            yield key, float(key % 2), images.jpeg_bytes(40, 60, seed=key)

    write_pack(tmp_path / "train_bi.rec", items(0, 20))
    write_pack(tmp_path / "valid_bi.rec", items(100, 6))
    out = tmp_path / "posters"
    run("import", str(tmp_path / "train_bi.rec"), "--val-from", str(tmp_path / "valid_bi.idx"),
        "--class-names", "Other,Thriller/Crime", "--out", str(out))
    manifest = load_manifest(str(out))
    assert manifest.classes == ["Other", "Thriller/Crime"]
    assert manifest.split("train").class_counts == {"Other": 10, "Thriller/Crime": 10}
    assert manifest.split("val").count == 6
    first = all_samples(out, "train")[0]
    assert first.image == images.jpeg_bytes(40, 60, seed=int(first.meta["id"]))  # small JPEGs pass through


def test_one_hot_genre_csv_top_level(tmp_path):
    """The 25-genre posters job: `Id, Genre, Action, Adventure, ...` with one 0/1 column per genre."""
    genres = ["Action", "Adventure", "Animation", "Comedy", "Drama"]
    lines = ["Id,Genre," + ",".join(genres)]
    for i in range(40):
        flags = [(i + k) % 3 == 0 or k == i % 5 for k in range(len(genres))]
        names = [g for g, f in zip(genres, flags) if f]
        images.write(tmp_path / "Images" / f"tt{i:07d}.jpg", images.jpeg_bytes(30, 45, seed=i))
        lines.append(f'tt{i:07d},"{names}",' + ",".join(str(int(f)) for f in flags))
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "genres"
    run("import", str(tmp_path / "train.csv"), "--images", str(tmp_path / "Images"), "--suffix", ".jpg", "--out", str(out))
    manifest = load_manifest(str(out))
    assert manifest.task == "multi" and manifest.classes == genres
    sample = all_samples(out, "train")[0]
    i = int(sample.meta["id"][2:])
    assert sample.meta["labels"] == [g for k, g in enumerate(genres) if (i + k) % 3 == 0 or k == i % 5]
