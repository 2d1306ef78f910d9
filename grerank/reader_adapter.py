"""The reader's LoRA adapter (peft), acting on the question and answer tokens only.

Documents (and the shared instruction prefix) are encoded with the adapter switched off, so their key/value
states stay bit-identical to the base model's: every cached state (``runs/doc-states``, the service's memory
and disk tiers) stays valid, and a training step costs what a frozen-reader step costs. The question and
answer tokens run through the adapted layers and learn to read those fixed states, as a Fusion-in-Decoder
decoder learns over fixed passage encodings (DESIGN.md section 4b).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

# Every projection of a Llama-family block: attention and MLP.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(
    model: torch.nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> PeftModel:
    """Inject a fresh LoRA adapter into ``model`` in place (its B matrices are zero: outputs unchanged)."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
    )
    return get_peft_model(model, config)


def load_lora(model: torch.nn.Module, folder: str | Path) -> PeftModel:
    """Inject the adapter saved in ``folder`` into ``model`` in place, frozen, for inference."""
    return PeftModel.from_pretrained(model, str(folder), is_trainable=False)


@contextmanager
def adapter_off(adapter: PeftModel | None) -> Iterator[None]:
    """Run the base model alone for the duration of the block (no-op without an adapter)."""
    with adapter.disable_adapter() if adapter is not None else nullcontext():
        yield


def lora_parameters(adapter: PeftModel) -> list[torch.nn.Parameter]:
    """The adapter's own weights (the only ones a reader training updates)."""
    return [p for name, p in adapter.named_parameters() if "lora_" in name]
