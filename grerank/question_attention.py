"""How much each document token is attended to by a question, per layer and head, over the reader's own
parallel-encoded document states: the signal of attention-based rerankers (ICR, Chen et al., ICLR 2025;
per-head selection as QRHead and RouteHead do).

One question pass runs over the cached states of every candidate (each visible). Its post-RoPE queries are
taken from each attention layer's input as the pass runs, and the attention weights are recomputed from them
and the cached keys in fp32, softmax over every key a question token sees (prefix, documents, the question
so far), rather than through ``output_attentions`` on the whole model: the weights of the few question rows
only, in full precision, whatever attention kernel the pass itself runs with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from grerank.decoder_reader import DecoderReader
from grerank.masked_attention import causal_block, document_log_mask, key_bias


def question_attention(
    reader: DecoderReader, question: str, doc_states: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Per document, ``[layers, heads, tokens]`` fp32: the attention weight each of its tokens gets from
    the question's tokens (its whole prompt, instruction to end), averaged over those tokens."""
    return question_pass(reader, question, doc_states)[0]


Layout = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # DecoderReader._layout of one question's documents


@torch.no_grad()
def question_pass(
    reader: DecoderReader, question: str, doc_states: Sequence[torch.Tensor], layout: Layout | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`question_attention`, and ``[layers, hidden]`` fp32: each attention layer's (normalised)
    input averaged over the question's tokens, the query representation a head router reads; one pass.
    ``layout``: the documents' concatenated states, when another pass over them already built it (a pass
    never changes it)."""
    n = len(doc_states)
    mask = torch.ones(1, n, device=reader.device)
    past, key_index, starts = layout or reader._layout([doc_states], mask)
    ids = torch.tensor([reader._question_ids(question)], device=reader.device)
    width = ids.shape[1]
    positions = starts[:, None] + torch.arange(width, device=reader.device)
    bias = key_bias(document_log_mask(mask), key_index)  # [1, K]: 0 for prefix and documents
    causal = causal_block(width, reader.device)[None]
    full = torch.cat([bias[:, None, :].expand(-1, width, -1), causal], dim=2)  # [1, T, K + T]

    layers = reader.model.base_model.layers
    captured: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured.append((hidden, kwargs["position_embeddings"]))

    hooks = [layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    try:
        cache = reader._run(ids, full, positions, past).past_key_values
    finally:
        for hook in hooks:
            hook.remove()

    documents = key_index.shape[1]
    per_layer = []
    for layer, (hidden, (cos, sin)), cached in zip(layers, captured, cache.layers, strict=True):
        attention = layer.self_attn
        queries = attention.q_proj(hidden).view(1, width, -1, attention.head_dim).transpose(1, 2)
        queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
        keys = cached.keys.float()  # [1, kvh, K + T, d], post-RoPE
        keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
        logits = queries.float() @ keys.transpose(-1, -2) * attention.scaling + full[:, None]
        weights = torch.softmax(logits, dim=-1)[..., :documents]  # [1, heads, T, K]
        per_layer.append(weights.mean(dim=2)[0])  # averaged over the question's tokens: [heads, K]
    stacked = torch.stack(per_layer)  # [layers, heads, K]
    pooled = torch.stack([hidden[0].float().mean(dim=0) for hidden, _ in captured])
    return [stacked[..., key_index[0] == i] for i in range(n)], pooled


NULL_QUESTION = "N/A"  # ICR's calibration question: what the prompt alone draws to each token


def calibrated_attention(
    reader: DecoderReader,
    question: str,
    doc_states: Sequence[torch.Tensor],
    null_question: str = NULL_QUESTION,
) -> list[torch.Tensor]:
    """:func:`question_attention` minus that of ``null_question`` over the same states: the attention a
    token gets because of this question, not because of its place or the instruction."""
    asked = question_attention(reader, question, doc_states)
    baseline = question_attention(reader, null_question, doc_states)
    return [a - b for a, b in zip(asked, baseline, strict=True)]


def head_scores(
    reader: DecoderReader, question: str, doc_states: Sequence[torch.Tensor], calibrate: bool = True
) -> torch.Tensor:
    """``[layers, heads, n]``: each head's score of each document, its (calibrated) attention summed over
    the document's tokens; what static head selection ranks heads by."""
    scores = (calibrated_attention if calibrate else question_attention)(reader, question, doc_states)
    return head_sums(scores)


def head_sums(token_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[layers, heads, n]`` from per-document ``[layers, heads, tokens]`` scores: summed over tokens."""
    return torch.stack([s.sum(dim=-1) for s in token_scores], dim=-1)


def icr_scores(
    reader: DecoderReader,
    question: str,
    doc_states: Sequence[torch.Tensor],
    heads: torch.Tensor | None = None,
    calibrate: bool = True,
) -> torch.Tensor:
    """In-context reranking scores ``[n]`` (:func:`icr_aggregate` of the question's attention)."""
    scores = (calibrated_attention if calibrate else question_attention)(reader, question, doc_states)
    return icr_aggregate(scores, heads)


def icr_aggregate(
    token_scores: Sequence[torch.Tensor], heads: torch.Tensor | None = None, token_filter: bool = True
) -> torch.Tensor:
    """``[n]`` from per-document ``[layers, heads, tokens]`` scores: per token, the sum over ``heads`` (a
    ``[layers, heads]`` boolean selection; default all of them); per document, the tokens scoring below
    mean - 2 std of that document's tokens are dropped (unless not ``token_filter``) and the rest summed."""
    out = []
    for tokens in token_scores:
        selected = tokens if heads is None else tokens[heads.to(tokens.device)]  # [..., tokens]
        per_token = selected.reshape(-1, tokens.shape[-1]).sum(dim=0)
        if token_filter:
            per_token = per_token[per_token >= per_token.mean() - 2 * per_token.std(correction=0)]
        out.append(per_token.sum())
    return torch.stack(out)
