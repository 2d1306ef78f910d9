"""The reader artifact: a LoRA adapter trained for the task over a named, checksummed base reader.

The folder holds peft's ``adapter_config.json`` and ``adapter_model.safetensors`` beside ``manifest.json``
(kind ``reader``): the base model's spec (``default`` or a folder) and the content checksum of its weights,
the prompt format the adapter was trained with, the token limits, data checksums, hyperparameters and dev
metrics (grerank.artifact). Loading verifies every file and refuses a base model whose weights differ from
the ones the adapter was trained on: an adapter over other weights would answer, just wrongly.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from grerank import model_paths
from grerank.artifact import ArtifactError, read_manifest, weights_checksum, write_folder
from grerank.decoder_reader import DecoderReader, PromptFormat
from grerank.reader_adapter import load_lora
from grerank.readers import Reader, load_reader

KIND = "reader"
# The trained default reader, committed with the code (`make train-reader` reproduces it).
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "reader"


def write_reader_artifact(folder: str | Path, reader: DecoderReader, base_spec: str, **sections: Any) -> Path:
    """Save ``reader``'s adapter and a manifest naming its base model (``base_spec`` as the user gave it)."""
    if reader.adapter is None:
        raise ValueError("this reader has no adapter to save")
    base_path = model_paths.resolve("reader", base_spec)
    base = {
        "spec": base_spec,
        "name_or_path": str(base_path) if base_spec != model_paths.DEFAULT else model_paths.DEFAULT,
        "family": reader.family,
        "weights_sha256": weights_checksum(base_path),
    }
    limits = {
        "max_document_tokens": reader.max_document_tokens,
        "max_question_tokens": reader.max_question_tokens,
        "max_answer_tokens": reader.max_answer_tokens,
    }

    def save(tmp: Path) -> None:
        reader.adapter.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's generic model card: the manifest says more

    return write_folder(
        folder,
        KIND,
        save,
        base_model=base,
        prompt=asdict(reader.prompt),
        limits=limits,
        **sections,
    )


def load_reader_artifact(
    folder: str | Path,
    base_spec: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[DecoderReader, dict[str, Any]]:
    """Verify ``folder`` and load its adapter over the base reader: ``base_spec`` when given (it must hold the
    same weights), else the base the manifest names. Returns ``(reader, manifest)``."""
    manifest = read_manifest(folder, kind=KIND)
    base = manifest["base_model"]
    spec = base_spec or base["spec"]
    base_path = model_paths.resolve("reader", spec)
    found = weights_checksum(base_path)
    if found != base["weights_sha256"]:
        raise ArtifactError(
            f"reader artifact {folder} was trained over base weights {base['weights_sha256'][:12]}... "
            f"({base['name_or_path']}), but the reader {spec!r} at {base_path} has {found[:12]}...: "
            "train an adapter for that reader, or point GRERANK_READER at the base it names"
        )
    reader = DecoderReader.from_pretrained(
        base_path, device=device, dtype=dtype, prompt=PromptFormat(**manifest["prompt"]), **manifest["limits"]
    )
    reader.adapter = load_lora(reader.model, folder).to(device)
    reader.adapter.requires_grad_(False)
    # A merged copy for generation (twice the weights' memory): the same function, without the adapter's
    # per-projection overhead on every generated token.
    merged = copy.deepcopy(reader.adapter).merge_and_unload()
    reader.answer_model = merged.to(dtype).eval()
    reader.adapter_id = manifest["files"]["adapter_model.safetensors"]
    return reader, manifest


def load_configured_reader(
    artifact: str | Path | None,
    base_spec: str = model_paths.DEFAULT,
    family: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Reader, dict[str, Any] | None]:
    """The reader a CLI or the service is configured with: ``artifact`` is a reader artifact folder,
    ``shipped`` (the trained default in this repository, for the default base; another base reader is used
    untrained) or ``none``/None (the base reader untrained). Returns ``(reader, manifest or None)``."""
    if artifact in (None, "none") or (artifact == "shipped" and base_spec != model_paths.DEFAULT):
        return load_reader(model_paths.resolve("reader", base_spec), family, device, dtype), None
    folder = SHIPPED if artifact == "shipped" else Path(artifact)
    if artifact == "shipped" and not (folder / "manifest.json").is_file():
        raise ArtifactError(
            f"the shipped reader artifact {folder} is missing: run `make train-reader`, or use the untrained "
            "reader ('none')"
        )
    explicit = None if base_spec == model_paths.DEFAULT else base_spec
    return load_reader_artifact(folder, explicit, device, dtype)
