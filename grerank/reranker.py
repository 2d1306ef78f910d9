"""Rerankers: score ``w_i = R(q, d_i)`` for a query and its candidate documents.

Two architectures behind one interface, the very classes that training updates and the service serves:

* ``BiEncoderReranker``: ``scale * cos(E(q), E(d))`` with a shared mean-pooled encoder (starts from the
  default MiniLM, so it is a useful reranker before any training).
* ``CrossEncoderReranker``: a BERT-style encoder over ``[CLS] q [SEP] d [SEP]`` with a one-logit head
  (a new head on MiniLM needs training before its scores mean anything).

``save``/``load`` use a folder with ``reranker.json`` beside the Hugging Face weights and tokenizer, or, for
a reranker trained as a LoRA adapter (``add_lora``), beside the adapter alone: ``reranker.json`` then names
the base model and the checksum of its weights, and ``load`` merges the adapter into them, so what is served
is a plain encoder (the service's batched backend reads its linear layers directly).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from grerank import model_paths
from grerank.checksums import ArtifactError, weights_checksum
from grerank.runtime import match_attention_to_pass
from grerank.sentence_encoder import SentenceEncoder

CONFIG_FILE = "reranker.json"
# The attention and feed-forward projections of every BERT-style layer (not the pooler).
LORA_TARGETS = r".*layer\.\d+\..*(query|key|value|dense)$"


class Reranker(torch.nn.Module):
    """Common interface: ``forward(queries, documents)`` gives one score tensor per query."""

    architecture: str
    lora_modules_to_save: list[str] | None = None  # new layers an adapter trains in full

    def __init__(self, base_model: str, max_length: int) -> None:
        super().__init__()
        self.base_model = base_model
        self.max_length = max_length
        self.adapter: PeftModel | None = None  # set by add_lora: only the adapter trains and is saved
        self.adapter_base: dict | None = None

    def encoder_model(self) -> torch.nn.Module:
        """The Hugging Face model an adapter wraps."""
        raise NotImplementedError

    def _set_encoder_model(self, model: torch.nn.Module) -> None:
        raise NotImplementedError

    def add_lora(self, base_spec: str, rank: int = 16, alpha: float = 32.0, dropout: float = 0.05) -> None:
        """Train a LoRA adapter instead of every weight; ``base_spec`` (``default`` or a folder) is what the
        saved reranker names as its base, with the checksum of the base weights."""
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=LORA_TARGETS,
            modules_to_save=self.lora_modules_to_save,
        )
        path = model_paths.resolve("reranker", base_spec)
        self.adapter_base = {"spec": base_spec, "weights_sha256": weights_checksum(path)}
        # Not registered as a submodule: it wraps the encoder already registered, and its weights would
        # appear twice in the state dict.
        object.__setattr__(self, "adapter", get_peft_model(self.encoder_model(), config))

    def _save_weights(self, folder: Path) -> None:
        if self.adapter is None:
            self.encoder_model().save_pretrained(folder)
        else:
            self.adapter.save_pretrained(folder)
            (folder / "README.md").unlink(missing_ok=True)  # peft's generic model card

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, queries: Sequence[str], documents: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, query: str, documents: Sequence[str], bf16: bool = False) -> torch.Tensor:
        """Scores ``[n]`` for one query, in inference mode (no dropout, no gradients)."""
        was_training = self.training
        self.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = self([query], [documents])[0].float().cpu()
        self.train(was_training)
        return scores

    def predict_many(
        self, queries: Sequence[str], documents: Sequence[Sequence[str]], bf16: bool = False
    ) -> list[torch.Tensor]:
        """``predict`` for many queries at once (offline evaluation); one score tensor per query."""
        return [self.predict(q, docs, bf16) for q, docs in zip(queries, documents, strict=True)]

    def config(self) -> dict:
        config = {"architecture": self.architecture, "base_model": self.base_model}
        config["max_length"] = self.max_length
        return config | ({"adapter_base": self.adapter_base} if self.adapter_base else {})

    def save(self, folder: str | Path) -> None:
        raise NotImplementedError

    @staticmethod
    def load(folder: str | Path) -> Reranker:
        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        cls = {"bi-encoder": BiEncoderReranker, "cross-encoder": CrossEncoderReranker}.get(
            config["architecture"]
        )
        if cls is None:
            raise ValueError(f"unknown reranker architecture {config['architecture']!r} in {folder}")
        kwargs = {k: v for k, v in config.items() if k not in ("architecture", "adapter_base")}
        base = config.get("adapter_base")
        if base is None:
            return cls.from_pretrained(folder, **kwargs)
        path = model_paths.resolve("reranker", base["spec"])
        if weights_checksum(path) != base["weights_sha256"]:
            raise ArtifactError(
                f"{folder} is an adapter over base weights {base['weights_sha256'][:12]}... "
                f"({base['spec']}), but {path} holds other weights"
            )
        reranker = cls.from_pretrained(path, **kwargs)
        reranker.tokenizer_from(folder)
        merged = PeftModel.from_pretrained(reranker.encoder_model(), str(folder)).merge_and_unload()
        reranker._set_encoder_model(merged)
        return reranker

    def _write_config(self, folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2) + "\n")


class BiEncoderReranker(Reranker):
    architecture = "bi-encoder"

    def __init__(self, encoder: SentenceEncoder, base_model: str, scale: float = 1.0) -> None:
        super().__init__(base_model, encoder.max_length)
        self.encoder = encoder
        self.scale = scale

    @classmethod
    def from_pretrained(
        cls, path: str | Path, base_model: str | None = None, max_length: int = 256, scale: float = 1.0
    ) -> BiEncoderReranker:
        return cls(SentenceEncoder.from_pretrained(path, max_length), base_model or str(path), scale)

    def forward(self, queries: Sequence[str], documents: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        # One encoder pass over every text of the batch; documents stay independent of each other.
        flat = [d for docs in documents for d in docs]
        embeddings = self.encoder([*queries, *flat])
        q, d = embeddings[: len(queries)], embeddings[len(queries) :]
        out, start = [], 0
        for i, docs in enumerate(documents):
            out.append(self.scale * d[start : start + len(docs)] @ q[i])
            start += len(docs)
        return out

    def predict_many(
        self, queries: Sequence[str], documents: Sequence[Sequence[str]], bf16: bool = False
    ) -> list[torch.Tensor]:
        # Each distinct text is embedded once, in length-sorted batches: about 2x faster than per query.
        texts = list(dict.fromkeys([*queries, *(d for docs in documents for d in docs)]))
        embeddings = torch.from_numpy(self.encoder.encode(texts, bf16=bf16))
        row = {text: i for i, text in enumerate(texts)}
        return [
            self.scale * embeddings[[row[d] for d in docs]] @ embeddings[row[q]]
            for q, docs in zip(queries, documents, strict=True)
        ]

    def config(self) -> dict:
        return {**super().config(), "scale": self.scale}

    def encoder_model(self) -> torch.nn.Module:
        return self.encoder.model

    def _set_encoder_model(self, model: torch.nn.Module) -> None:
        self.encoder.model = model

    def tokenizer_from(self, folder: Path) -> None:
        self.encoder.tokenizer = AutoTokenizer.from_pretrained(folder)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_weights(folder)
        self.encoder.tokenizer.save_pretrained(folder)
        self._write_config(folder)


class CrossEncoderReranker(Reranker):
    architecture = "cross-encoder"
    lora_modules_to_save = ["classifier"]  # the new one-logit head

    def __init__(self, model: torch.nn.Module, tokenizer, base_model: str, max_length: int = 256) -> None:
        super().__init__(base_model, max_length)
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls, path: str | Path, base_model: str | None = None, max_length: int = 256
    ) -> CrossEncoderReranker:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        return cls(model, AutoTokenizer.from_pretrained(path), base_model or str(path), max_length)

    def forward(self, queries: Sequence[str], documents: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        firsts = [q for q, docs in zip(queries, documents, strict=True) for _ in docs]
        seconds = [d for docs in documents for d in docs]
        match_attention_to_pass(self.model)
        batch = self.tokenizer(
            firsts,
            seconds,
            padding=True,
            truncation="only_second",
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        logits = self.model(**batch).logits[:, 0].float()
        return list(logits.split([len(docs) for docs in documents]))

    def encoder_model(self) -> torch.nn.Module:
        return self.model

    def _set_encoder_model(self, model: torch.nn.Module) -> None:
        self.model = model

    def tokenizer_from(self, folder: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_weights(folder)
        self.tokenizer.save_pretrained(folder)
        self._write_config(folder)


def build_reranker(architecture: str, path: str | Path, **kwargs) -> Reranker:
    """A fresh reranker of ``architecture`` from a Hugging Face folder (e.g. the default MiniLM)."""
    if architecture == "bi-encoder":
        return BiEncoderReranker.from_pretrained(path, **kwargs)
    if architecture == "cross-encoder":
        return CrossEncoderReranker.from_pretrained(path, **kwargs)
    raise ValueError(f"unknown reranker architecture {architecture!r}; expected bi-encoder or cross-encoder")
