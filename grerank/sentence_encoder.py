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

from grerank.runtime import match_attention_to_pass


class SentenceEncoder(torch.nn.Module):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 256,
        max_padding: float = 0.25,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_padding = max_padding  # see forward; infinity pads every text to the longest, as before
        # "auto": the faster attention for each call's pass (runtime.match_attention_to_pass);
        # or a fixed transformers implementation ("sdpa", "eager").
        self.attention = "auto"

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
        """Embeddings ``[N, dim]`` with gradients (the caller chooses ``no_grad``).

        Texts run in length-sorted groups whose padding stays within ``max_padding`` of their real tokens:
        a training batch of 44 texts averaging 124 tokens, padded as one to the 256 of its longest, spent
        about half its encoder FLOPs (and more of its attention) on padding. Each text's embedding does not
        depend on its group, up to rounding.
        """
        if self.attention == "auto":
            match_attention_to_pass(self.model)
        elif self.model.config._attn_implementation != self.attention:
            self.model.set_attn_implementation(self.attention)
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        groups: list[list[int]] = []
        for i in order:  # longest first: a group's width is its first text's length
            group = groups[-1] if groups else None
            if group and len(encoded[group[0]]) * (len(group) + 1) <= (1 + self.max_padding) * sum(
                len(encoded[j]) for j in [*group, i]
            ):
                group.append(i)
            else:
                groups.append([i])
        pooled: list[torch.Tensor | None] = [None] * len(encoded)
        batches = [
            self.tokenizer.pad({"input_ids": [encoded[i] for i in group]}, return_tensors="pt").to(
                self.device
            )
            for group in groups
        ]
        # One lookup for every group's tokens: each lookup's backward fills a vocabulary-sized gradient.
        ids = [batch.pop("input_ids") for batch in batches]
        words = self.model.get_input_embeddings()(torch.cat([i.flatten() for i in ids]))
        for group, batch, shape, embedded in zip(
            groups, batches, [i.shape for i in ids], words.split([i.numel() for i in ids]), strict=True
        ):
            hidden = self.model(inputs_embeds=embedded.view(*shape, -1), **batch).last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            means = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            for row, i in enumerate(group):
                pooled[i] = means[row]
        return torch.nn.functional.normalize(torch.stack(pooled).float(), dim=-1)  # type: ignore[arg-type]

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
