"""Which of the reader's attention heads to trust for a question: a head set, fixed (QRHead-style static
selection) or routed per question (RouteHead, Tian et al. 2026), and the document scores it gives.

A document's score is the sum, over the selected heads, of that head's calibrated attention mass on the
document (grerank.question_attention: the question's attention summed over the document's tokens, minus the
"N/A" question's). Summing masses keeps heads on one scale (each is a share of a head's attention), so a
set's score is linear in its heads; ICR's per-token filter is left out (measured on dev: within a point).

The router reads the question pass's own pooled hidden state at one layer (no extra pass), standardised by
the train questions' statistics, projects it to a small space where every head has a learnt embedding, and
gives each head a logit; a head is selected when its logit is among the top ``top_m``, or, with ``top_m`` 0,
when its probability passes one half (at least one head). Trained offline (``training.train_router``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from grerank.decoder_reader import DecoderReader
from grerank.question_attention import NULL_QUESTION, head_sums, question_pass

CONFIG = "router.json"
WEIGHTS = "router.safetensors"


@dataclass(frozen=True)
class RouterConfig:
    layers: int
    heads: int
    hidden: int
    query_layer: int  # whose pooled input represents the question
    dim: int = 32
    top_m: int = 4  # heads kept per question; 0: every head with probability >= 0.5
    static: bool = False  # a fixed head set: the learnt biases alone decide, whatever the question


class HeadRouter(nn.Module):
    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        # The train questions' mean and spread of the pooled state: what every question shares would
        # otherwise dominate the projection and route every question to the same heads.
        self.register_buffer("center", torch.zeros(config.hidden))
        self.register_buffer("scale", torch.ones(config.hidden))
        self.norm = nn.LayerNorm(config.hidden)  # bounds a question far outside the train spread
        self.project = nn.Linear(config.hidden, config.dim)
        self.head_embeddings = nn.Parameter(torch.randn(config.layers * config.heads, config.dim) * 0.02)
        self.bias = nn.Parameter(torch.zeros(config.layers * config.heads))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Head logits ``[B, layers * heads]`` from pooled question states ``[B, layers, hidden]``."""
        if self.config.static:
            return self.bias.expand(pooled.shape[0], -1)
        query = self.project(
            self.norm((pooled[:, self.config.query_layer].float() - self.center) / self.scale)
        )
        return query @ self.head_embeddings.T / math.sqrt(self.config.dim) + self.bias

    @torch.no_grad()
    def standardise(self, pooled: torch.Tensor) -> None:
        """Take the centre and scale of the query inputs from ``pooled`` ``[N, layers, hidden]``."""
        inputs = pooled[:, self.config.query_layer].float()
        self.center.copy_(inputs.mean(dim=0))
        self.scale.copy_(inputs.std(dim=0) + 1e-3)

    @torch.no_grad()
    def select(self, pooled: torch.Tensor) -> torch.Tensor:
        """Boolean head sets ``[B, layers, heads]``."""
        return select(self(pooled), self.config.top_m).view(-1, self.config.layers, self.config.heads)

    @torch.no_grad()
    def scores(self, pooled: torch.Tensor, calibrated: torch.Tensor) -> torch.Tensor:
        """Document scores ``[n]`` of one question: ``pooled`` ``[layers, hidden]``, ``calibrated``
        ``[layers, heads, n]`` head masses."""
        return aggregate(calibrated, self.select(pooled[None])[0])

    def save(self, folder: Path) -> None:
        (folder / CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)

    @classmethod
    def load(cls, folder: str | Path) -> HeadRouter:
        folder = Path(folder)
        router = cls(RouterConfig(**json.loads((folder / CONFIG).read_text())))
        router.load_state_dict(load_file(folder / WEIGHTS))
        return router.eval()

    @classmethod
    def fixed(cls, heads: torch.Tensor, hidden: int) -> HeadRouter:
        """A static router selecting exactly ``heads`` (boolean ``[layers, heads]``)."""
        layers, per_layer = heads.shape
        config = RouterConfig(layers, per_layer, hidden, 0, top_m=int(heads.sum()), static=True)
        router = cls(config)
        with torch.no_grad():
            router.bias.copy_(torch.where(heads.flatten(), 1.0, -1.0))
        return router.eval()


def select(logits: torch.Tensor, top_m: int) -> torch.Tensor:
    """Boolean ``[B, heads]``: the ``top_m`` largest logits (ties by head index), or with ``top_m`` 0 every
    logit >= 0 and at least the largest."""
    if top_m > 0:
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_m]
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, True)
    chosen = logits >= 0
    chosen[torch.arange(len(logits)), logits.argmax(dim=-1)] = True
    return chosen


def aggregate(calibrated: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """``[n]``: masses ``[layers, heads, n]`` summed over the heads a boolean ``[layers, heads]`` selects."""
    return calibrated[heads.to(calibrated.device)].sum(dim=0)


def head_masses(
    reader: DecoderReader, question: str, doc_states: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each head's attention mass on each document ``[layers, heads, n]`` under ``question`` and under "N/A",
    and the question's pooled states ``[layers, hidden]``: two question passes over the cached states,
    sharing their layout. What a router is trained on and what it scores with."""
    layout = reader._layout([doc_states], torch.ones(1, len(doc_states), device=reader.device))
    asked, pooled = question_pass(reader, question, doc_states, layout)
    null, _ = question_pass(reader, NULL_QUESTION, doc_states, layout)
    return head_sums(asked), head_sums(null), pooled


def attention_scores(
    reader: DecoderReader, router: HeadRouter, question: str, doc_states: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Document scores ``[n]`` from the reader's heads the router picks for ``question``."""
    asked, null, pooled = head_masses(reader, question, doc_states)
    return router.scores(pooled, asked - null)
