"""Image-level outliers: tiny for the dataset they are in, nearly blank, extreme aspect."""

from __future__ import annotations

from tagmill.doctor.outliers import image_outliers
from tagmill.doctor.scan import ImageFacts


def fact(width: int, height: int, spread: float = 40.0) -> ImageFacts:
    return ImageFacts(f"k{width}x{height}", "id", "train", ("a",), width, height, "d", 0, spread)


def reasons(facts: list[ImageFacts]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for outlier in image_outliers(facts):
        found.setdefault(outlier.row, set()).add(outlier.reason)
    return found


def test_tiny_means_small_for_its_dataset() -> None:
    # a set of 28-pixel images (Fashion-MNIST): none of them is an outlier for its size
    assert reasons([fact(28, 28) for _ in range(50)]) == {}
    # a 20-pixel image among 300-pixel photos is
    assert reasons([*(fact(300, 400) for _ in range(20)), fact(20, 24)]) == {20: {"tiny"}}
    # and a 12-pixel one among 28-pixel images (under half the usual size)
    assert reasons([*(fact(28, 28) for _ in range(20)), fact(12, 12)]) == {20: {"tiny"}}


def test_blank_and_extreme_aspect() -> None:
    found = reasons([*(fact(200, 200) for _ in range(5)), fact(200, 200, spread=0.5), fact(1000, 100)])
    assert found == {5: {"nearly-blank"}, 6: {"extreme-aspect"}}
