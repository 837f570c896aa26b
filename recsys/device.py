"""Device choice shared by training, evaluation, promotion and scoring."""

from __future__ import annotations

import torch


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without it is an error, not a silent CPU run.

    ``setting`` names the config key in the error (e.g. ``train.device``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{setting}=cuda but CUDA is not available on this machine")
    return torch.device(name)
