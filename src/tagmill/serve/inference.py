"""The two halves of :class:`Predictor` that a batching server needs separately.

``Predictor.predict_bytes`` decodes, runs and post-processes one request's images in
one call. The server decodes in a thread pool, runs many requests' images in one
forward pass, then post-processes each request with its own top-k and threshold;
so it needs those steps apart. They are the Predictor's own steps (same decoder,
same transform, same post-processing), which is what keeps served scores identical
to ``tagmill predict``. Upstream wish: make these three methods public on Predictor.
"""

from __future__ import annotations

import torch

from tagmill.bundle.predictor import Prediction, Predictor, Threshold
from tagmill.errors import UnreadableImageError


class ServingPredictor(Predictor):
    """A :class:`Predictor` whose preprocessing and post-processing can run apart."""

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Encoded image → model input (3, S, S), exactly as ``predict_bytes`` does it."""
        try:
            return self.transform(self._decode(data))
        except UnreadableImageError:
            raise
        except (OSError, ValueError, SyntaxError) as exc:  # e.g. broken EXIF met by to_rgb
            raise UnreadableImageError(f"corrupt image: {exc}") from exc

    def resolve_options(self, top_k: int | None, threshold: Threshold | None) -> tuple[int, list[float] | None]:
        """Check per-request options before any work; InputError when they are bad."""
        return self._resolve_top_k(top_k), self._resolve_thresholds(threshold)

    def postprocess(self, logits: torch.Tensor, top_k: int, thresholds: list[float] | None) -> list[Prediction]:
        """(N, C) logits → one Prediction per row; options from :meth:`resolve_options`."""
        return self._postprocess(logits, top_k, thresholds)
