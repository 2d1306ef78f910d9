"""Decoder-only reader with documents encoded in parallel and differentiable masked attention.

Layout of what the reader sees (DESIGN.md section 3)::

    [instruction prefix] [doc 1] [doc 2] ... [doc n] [question + answer]

* The prefix is encoded once.
* Each document is encoded on its own after the prefix: its positions restart at ``P`` (the prefix length),
  it attends to the prefix and causally to itself. Its key/value states therefore depend on nothing but
  the document, so they are computed without gradients once and reused (training epochs, service queries).
* The question and answer tokens start at position ``P + max_i len(doc_i)`` (over the documents with a
  non-zero mask), attend to the prefix, to every document with the DMA bias ``log M_i``
  (:mod:`grerank.masked_attention`), and causally to themselves. Only these tokens carry gradients. Their
  attention runs as :func:`~grerank.masked_attention.scaled_value_attention` (registered with transformers
  as ``SCALED_VALUES``), eager attention only where attention weights are asked for.

Works with any Hugging Face causal LM that takes a 4D additive attention mask, explicit ``position_ids``
and a ``DynamicCache`` (Llama, Qwen2, Mistral, Gemma families).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerBase

from grerank.masked_attention import (
    causal_block,
    concat_documents,
    document_log_mask,
    grouped_causal_mask,
    key_bias,
    key_scale,
    scaled_value_attention,
    to_additive,
)
from grerank.passage import Passage
from grerank.reader_adapter import adapter_off
from grerank.readers import Reader
from grerank.text_stream import IncrementalDecoder

SCALED_VALUES = "grerank_scaled_values"


def _scaled_value_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention interface over :func:`scaled_value_attention`: ``attention_mask`` is its
    grouped causal mask and the ``key_scale`` keyword the per-key mask (both from ``_answer_forward``)."""
    return scaled_value_attention(query, key, value, kwargs["key_scale"], attention_mask, scaling), None


AttentionInterface.register(SCALED_VALUES, _scaled_value_attention)


@dataclass(frozen=True)
class PromptFormat:
    """Text templates of the four segments; ``stop`` ends a generated answer."""

    prefix: str
    document: str
    question: str
    answer: str
    stop: str

    @staticmethod
    def for_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        template = getattr(tokenizer, "chat_template", None) or ""
        return CHATML if "<|im_start|>" in template else PLAIN


CHATML = PromptFormat(
    prefix=(
        "<|im_start|>system\nAnswer the question with a short phrase, using the documents.<|im_end|>\n"
        "<|im_start|>user\nDocuments:\n"
    ),
    document="{title}: {text}\n\n",
    question="Question: {question}\nAnswer in a few words.<|im_end|>\n<|im_start|>assistant\n",
    answer="{answer}<|im_end|>",
    stop="<|im_end|>",
)

PLAIN = PromptFormat(
    prefix="Answer the question using the documents.\n",
    document="{title}: {text}\n",
    question="Question: {question}\nAnswer:",
    answer=" {answer}\n",
    stop="\n",
)


class DecoderReader(Reader):
    """A frozen causal LM that reads parallel-encoded documents under a (soft) document mask.

    Document states are tensors ``[layers, 2, kv_heads, length, head_dim]`` (keys and values).
    """

    auto_model = AutoModelForCausalLM
    family = "decoder"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt: PromptFormat | None = None,
        max_document_tokens: int = 256,
        max_question_tokens: int = 128,
        max_answer_tokens: int = 32,
        adapter=None,
    ) -> None:
        # ``adapter``: a peft model wrapping ``model`` (grerank.reader_adapter); it acts on question and
        # answer tokens only, so the prefix and document states below are always the base model's.
        self.model = model.eval().requires_grad_(False)
        self.adapter = adapter
        # Greedy generation's question and answer passes, with the adapter merged into a copy of the
        # weights (grerank.reader_artifact): peft's unmerged LoRA costs about 1.6x the time to first token.
        self.answer_model: torch.nn.Module | None = None
        # The question/answer pass's attention: SCALED_VALUES, or "eager" (the earlier one, for comparison).
        self.answer_attention = SCALED_VALUES
        self.tokenizer = tokenizer
        self.prompt = prompt or PromptFormat.for_tokenizer(tokenizer)
        self.max_document_tokens = max_document_tokens
        self.max_question_tokens = max_question_tokens
        self.max_answer_tokens = max_answer_tokens
        self.prefix_ids = self._ids(self.prompt.prefix)
        self._prefix_states: torch.Tensor | None = None
        self.eos_ids = {i for i in (tokenizer.eos_token_id, *self._ids(self.prompt.stop)) if i is not None}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _run(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        states: torch.Tensor | None,
        output_attentions: bool = False,
        **attention_kwargs: torch.Tensor,
    ):
        """Forward ``ids`` after past ``states`` [layers, 2, B, kvh, K, d] under the additive ``mask``
        [B, T, K + T] (or, already 4-D, the attention implementation's own mask); returns the base model's
        output (hidden states, cache, optionally attentions)."""
        past = DynamicCache() if states is None else DynamicCache(ddp_cache_data=[(k, v) for k, v in states])
        return self.model.base_model(
            input_ids=ids,
            attention_mask=mask if mask.dim() == 4 else to_additive(mask[:, None], self.dtype),
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
            output_attentions=output_attentions,
            **attention_kwargs,
        )

    @contextmanager
    def _attention(self, implementation: str) -> Iterator[None]:
        """Run the model with another attention implementation for the duration of the block."""
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(implementation)
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)

    @staticmethod
    def _cache_tensor(cache: DynamicCache, start: int) -> torch.Tensor:
        """Stack a cache's keys and values from ``start`` on into ``[layers, 2, B, kvh, K, d]``."""
        return torch.stack(
            [
                torch.stack([layer.keys[..., start:, :], layer.values[..., start:, :]])
                for layer in cache.layers
            ]
        )

    # ---- prefix and documents: no gradients, computed once ----------------------------------------------

    @torch.no_grad()
    def prefix_states(self) -> torch.Tensor:
        """Key/value states of the instruction prefix, ``[layers, 2, kvh, P, d]``."""
        if self._prefix_states is None:
            ids = torch.tensor([self.prefix_ids], device=self.device)
            length = ids.shape[1]
            positions = torch.arange(length, device=self.device)[None]
            with adapter_off(self.adapter):
                cache = self._run(ids, causal_block(length, self.device)[None], positions, None)
            cache = cache.past_key_values
            self._prefix_states = self._cache_tensor(cache, 0)[:, :, 0]
        return self._prefix_states

    def input_format(self) -> str:
        return f"{self.prompt.prefix}|{self.prompt.document}|{self.max_document_tokens}"

    def document_ids(self, passage: Passage) -> list[int]:
        text = self.prompt.document.format(title=passage.title, text=passage.text)
        return self._ids(text)[: self.max_document_tokens]

    @torch.no_grad()
    def encode_documents(
        self, passages: Sequence[Passage], question: str | None = None, batch_size: int = 1
    ) -> list[torch.Tensor]:
        """Key/value states of each passage, encoded on its own after the prefix (``question`` is unused)."""
        del question  # decoder documents do not depend on the question: that is what makes them cacheable
        prefix = self.prefix_states()
        prefix_len = prefix.shape[-2]
        token_lists = [self.document_ids(p) for p in passages]
        states: list[torch.Tensor | None] = [None] * len(passages)
        order = sorted(range(len(passages)), key=lambda i: len(token_lists[i]))  # length-sorted: less padding
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            lengths = [len(token_lists[i]) for i in chunk]
            width = max(max(lengths), 1)
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.tensor(
                [token_lists[i] + [pad] * (width - len(token_lists[i])) for i in chunk], device=self.device
            )
            mask = torch.cat(
                [torch.zeros(width, prefix_len, device=self.device), causal_block(width, self.device)], dim=1
            ).expand(len(chunk), -1, -1)
            positions = (prefix_len + torch.arange(width, device=self.device)).expand(len(chunk), -1)
            past = prefix[:, :, None].expand(-1, -1, len(chunk), -1, -1, -1).contiguous()
            with adapter_off(self.adapter):
                cache = self._run(ids, mask, positions, past).past_key_values
            doc_states = self._cache_tensor(cache, prefix_len)
            for row, (i, length) in enumerate(zip(chunk, lengths, strict=True)):
                states[i] = doc_states[:, :, row, :, :length].clone()
        return states  # type: ignore[return-value]

    # ---- question and answer: the differentiable part ---------------------------------------------------

    def _layout(
        self, doc_states: Sequence[Sequence[torch.Tensor]], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Past states [layers, 2, B, kvh, K, d], key document index [B, K], question start [B]."""
        prefix = self.prefix_states()
        docs = [[d.to(self.device, self.dtype) for d in row] for row in doc_states]
        # States are [layers, 2, kvh, L, d]: the sequence is dim -2, the batch goes in at dim 2.
        past, key_index = concat_documents(docs, seq_dim=-2, batch_dim=2, lead=prefix)
        visible = [[d.shape[-2] for i, d in enumerate(row) if mask[b, i] != 0] for b, row in enumerate(docs)]
        starts = torch.tensor([prefix.shape[-2] + max(v, default=0) for v in visible], device=self.device)
        return past, key_index, starts

    def _question_ids(self, question: str) -> list[int]:
        return self._ids(self.prompt.question.format(question=question))[-self.max_question_tokens :]

    def _answer_forward(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        doc_states: Sequence[Sequence[torch.Tensor]],
        mask: torch.Tensor,
        output_attentions: bool = False,
    ):
        """Run question + answer tokens over the documents under ``mask``.

        Returns ``(model output, token ids [B, T], answer targets [B, T - 1], key document index [B, K])``;
        target ``t`` is True where position ``t`` predicts an answer token.
        """
        past, key_index, starts = self._layout(doc_states, mask)
        q_ids = [self._question_ids(q) for q in questions]
        a_ids = [self._ids(self.prompt.answer.format(answer=a))[: self.max_answer_tokens] for a in answers]
        seqs = [q + a for q, a in zip(q_ids, a_ids, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=self.device)
        positions = starts[:, None] + torch.arange(width, device=self.device)

        mask = mask.to(self.device, torch.float32)
        eager = self.answer_attention == "eager" or getattr(self.model.config, "attn_logit_softcapping", None)
        if output_attentions or eager:
            # Eager attention: only it returns attention weights (and it applies soft-capping).
            bias = key_bias(document_log_mask(mask), key_index)  # [B, K]
            attn = torch.cat(
                [
                    bias[:, None, :].expand(-1, width, -1),
                    causal_block(width, self.device).expand(len(seqs), -1, -1),
                ],
                dim=2,
            )
            with self._attention("eager"):
                out = self._run(ids, attn, positions, past, output_attentions)
        else:
            # Keys: past states then the question and answer tokens themselves (always visible to later ones).
            scale = torch.cat([key_scale(mask, key_index), mask.new_ones(len(seqs), width)], dim=1)
            config = self.model.config
            groups = config.num_attention_heads // config.num_key_value_heads
            causal = grouped_causal_mask(width, scale.shape[1], groups, self.dtype, self.device)
            with self._attention(SCALED_VALUES):
                out = self._run(ids, causal, positions, past, key_scale=scale)
        target = torch.zeros(len(seqs), width - 1, dtype=torch.bool, device=self.device)
        for b, (q, a) in enumerate(zip(q_ids, a_ids, strict=True)):
            target[b, len(q) - 1 : len(q) + len(a) - 1] = True  # position t predicts token t + 1
        return out, ids, target, key_index

    def answer_log_likelihood(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        doc_states: Sequence[Sequence[torch.Tensor]],
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each answer given its documents under ``mask`` ``[B, n]``.

        Returns ``(sum of answer-token log-probs [B], number of answer tokens [B])``; differentiable in
        ``mask``.
        """
        out, ids, target, _ = self._answer_forward(questions, answers, doc_states, mask)
        # The vocabulary head only on the positions that predict an answer token (a few of each row's dozens).
        hidden = out.last_hidden_state[:, :-1][target]
        logits = self.model.get_output_embeddings()(hidden).float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[:, 1:][target][:, None])[:, 0]
        rows = target.nonzero()[:, 0]
        return logprobs.new_zeros(len(questions)).index_add(0, rows, logprobs), target.sum(dim=1)

    @torch.no_grad()
    def document_attention(
        self, questions: Sequence[str], answers: Sequence[str], doc_states: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Attention score ``[B, n]`` of each document with every document visible, the target of attention
        distillation as Izacard & Grave (2021) aggregate it: the attention logits of the position that
        predicts the first answer token, averaged over layers, heads and the document's tokens.

        A mean over the document's tokens, as published, not their summed attention mass, which grows with
        the document's length. The logits are
        recovered as log-probabilities: ``log a = s - logsumexp(s)``, and the subtracted term is shared by
        every key of a query, so the documents' averages differ from the logits' by one constant, which the
        softmax over documents ignores.
        """
        n = max(len(row) for row in doc_states)
        mask = torch.ones(len(questions), n, device=self.device)
        out, _, target, key_index = self._answer_forward(
            questions, answers, doc_states, mask, output_attentions=True
        )
        first = target.float().argmax(1)  # the position that predicts the first answer token, per question
        rows = torch.arange(len(questions), device=self.device)
        # [layers, B, heads, T, K_past + T] -> that position's past keys, mean log weight over layers, heads
        weights = torch.stack(out.attentions)[:, rows, :, first, : key_index.shape[1]]
        logits = weights.float().clamp_min(torch.finfo(torch.float32).tiny).log().mean(dim=(0, 2))  # [B, K]
        bucket = torch.where(key_index >= 0, key_index, n)  # prefix and padding keys share a spare bucket
        total = logits.new_zeros(len(questions), n + 1).scatter_add_(1, bucket, logits)
        count = logits.new_zeros(len(questions), n + 1).scatter_add_(1, bucket, torch.ones_like(logits))
        return (total / count.clamp_min(1))[:, :n]

    # ---- generation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def stream_answer(
        self, question: str, doc_states: Sequence[torch.Tensor], max_new_tokens: int = 32
    ) -> Iterator[str]:
        """Greedy answer given these documents (all fully visible), yielded as text pieces."""
        mask = torch.ones(1, len(doc_states), device=self.device)
        past, _, starts = self._layout([doc_states], mask)
        ids = self._question_ids(question)
        position = int(starts[0])
        keys = past.shape[-2]
        step = torch.tensor([ids], device=self.device)
        cache = DynamicCache(ddp_cache_data=[(layer[0], layer[1]) for layer in past])
        text = IncrementalDecoder(self.tokenizer, self.prompt.stop)
        generator = self.answer_model or self.model
        for _ in range(max_new_tokens):
            length = step.shape[1]
            attn = torch.cat(
                [torch.zeros(length, keys, device=self.device), causal_block(length, self.device)], dim=1
            )[None, None]
            out = generator.base_model(
                input_ids=step,
                attention_mask=to_additive(attn, self.dtype),
                position_ids=torch.arange(position, position + length, device=self.device)[None],
                past_key_values=cache,
                use_cache=True,
            )
            # The head on a 2-D row: Hugging Face's ``logits_to_keep=1`` hands it a strided 3-D slice, for
            # which torch.matmul copies the whole vocabulary-sized weight (about 50 ms per prompt here).
            logits = generator.get_output_embeddings()(out.last_hidden_state[:, -1])
            cache, keys, position = out.past_key_values, keys + length, position + length
            token = int(logits[0].argmax())
            if token in self.eos_ids:
                break
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                return
            step = torch.tensor([[token]], device=self.device)
        piece = text.finish()
        if piece:
            yield piece
