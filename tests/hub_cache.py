"""A Hugging Face hub cache made on the spot, as ``hf download`` would leave it.

timm writes the repository's files itself (``save_for_hf``: ``model.safetensors`` and
``config.json``, its real format); this module lays them out the way huggingface_hub
caches them (``models--ORG--NAME/snapshots/COMMIT/...`` and ``refs/main``), so the code
under test reads them through huggingface_hub exactly as it would on a machine that
downloaded them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import timm
import torch


def add_timm_repo(cache: Path, name: str, *, pretrained_cfg: dict[str, Any] | None = None, seed: int = 0,
                  repo: str | None = None) -> dict[str, torch.Tensor]:
    """Put randomly initialised (seeded) weights of timm model ``name`` (``arch.tag``) in
    ``cache`` as the repository ``repo`` (default ``timm/NAME``); ``pretrained_cfg``
    overrides fields of the config.json timm writes. Returns the saved state dict."""
    from timm.models._hub import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    repo = repo or f"timm/{name}"
    commit = hashlib.sha1(f"{repo}{seed}".encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    save_for_hf(model, str(snapshot), safe_serialization=True)
    if pretrained_cfg:
        config_path = snapshot / "config.json"
        config = json.loads(config_path.read_text())
        config["pretrained_cfg"].update(pretrained_cfg)
        config_path.write_text(json.dumps(config))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return {key: value.clone() for key, value in model.state_dict().items()}
