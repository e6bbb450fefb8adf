"""Choices a run makes from its data when the user leaves them open.

* **Input size.** An ImageNet backbone is run at its native size (224 px for Lite0)
  by default, but upsampling a 28-px or 64-px image to 224 adds no detail and costs
  (224/s)² times the compute of running at s. So the input side is twice the images'
  typical shorter side (measured on a sample of the training images), rounded up to a
  multiple of 32 (the network's stride), at least :data:`MIN_SIDE` and at most the
  native size. On the demo's 28-px product shots a head on 128-px features scored
  87.4% against 86.2% at 224 px, at a third of the cost. The rule is not yet a
  measurement: on 72-px drawings (bench dataset A) 160 px may be what loses to a
  224-px probe.
* **Feature-cache views.** One plain view of every image, plus one augmented view when
  the input is small enough that the extra pass costs less than the native-size pass
  it replaces; at the native size a second view would double the dominant cost.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tagmill import storage
from tagmill.dataset.images import header_size
from tagmill.dataset.manifest import Manifest
from tagmill.dataset.shards import iter_shard

#: below this the last feature map of a stride-32 network is 4×4 or less: too coarse
MIN_SIDE = 128
#: images measured to find the typical size (headers only: milliseconds)
SAMPLE = 256
#: a second (augmented) cache view is added when the input has at most this fraction
#: of the native size's pixels, so both views together cost less than one native pass
SECOND_VIEW_MAX_PIXELS = 0.5


@dataclass(frozen=True)
class Choice:
    value: int
    reason: str


def typical_shorter_side(dataset: str, manifest: Manifest, split: str = "train", limit: int = SAMPLE) -> int:
    """The median shorter side of up to ``limit`` images of ``split`` (read in shard order)."""
    sides: list[int] = []
    for shard in manifest.split(split).shards:
        for sample in iter_shard(storage.join(dataset, shard.name)):
            sides.append(min(header_size(sample.image)))
            if len(sides) >= limit:
                return int(statistics.median(sides))
    return int(statistics.median(sides)) if sides else 0


def choose_input_size(native: int, typical_side: int) -> Choice:
    if typical_side <= 0 or 2 * typical_side >= native:
        return Choice(native, f"the backbone's native {native} px (images are about {typical_side} px)")
    size = min(native, max(MIN_SIDE, -(-2 * typical_side // 32) * 32))
    saving = (native / size) ** 2
    return Choice(
        size,
        f"{size} px: the images are about {typical_side} px, so {native} px would cost {saving:.1f}× "
        "the compute for detail they do not have (--image-size overrides)",
    )


def choose_cache_views(native: int, size: int) -> Choice:
    if (size / native) ** 2 <= SECOND_VIEW_MAX_PIXELS:
        return Choice(2, "2 cached views (plain + augmented): at this input size the second costs less than a native-size pass")
    return Choice(1, "1 cached view: at this input size an augmented second view would double the backbone's work")


__all__ = ["Choice", "MIN_SIDE", "choose_cache_views", "choose_input_size", "typical_shorter_side"]
