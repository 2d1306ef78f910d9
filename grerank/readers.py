"""Pick the reader family for a model folder: decoder-only (default) or Fusion-in-Decoder (T5)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

READER_FAMILIES = ("auto", "decoder", "fid")


def load_reader(
    path: str | Path,
    family: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A frozen reader for ``path``; ``auto`` picks FiD for encoder-decoder models, else decoder-only."""
    if family not in READER_FAMILIES:
        raise ValueError(f"unknown reader family {family!r}; expected one of {READER_FAMILIES}")
    if family == "auto":
        family = "fid" if AutoConfig.from_pretrained(path).is_encoder_decoder else "decoder"
    if family == "fid":
        from grerank.fid_reader import FiDReader

        return FiDReader.from_pretrained(path, device=device, dtype=dtype)
    from grerank.decoder_reader import DecoderReader

    return DecoderReader.from_pretrained(path, device=device, dtype=dtype)
