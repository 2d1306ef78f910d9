"""Mean-pooled, L2-normalised sentence embeddings from a BERT-style encoder (the MiniLM recipe).

Used as the FAISS embedder and as the tower of the bi-encoder reranker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase


class SentenceEncoder(torch.nn.Module):
    def __init__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_length: int = 256
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 256) -> SentenceEncoder:
        return cls(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), max_length)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[N, dim]`` with gradients (the caller chooses ``no_grad``)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        progress: bool = False,
        bf16: bool = False,
    ) -> np.ndarray:
        """Embeddings as float32 numpy ``[N, dim]``; length-sorted batches waste less padding."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                out[idx] = self([texts[i] for i in idx]).cpu().numpy()
        self.train(was_training)
        return out
