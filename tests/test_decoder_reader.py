"""The decoder reader: parallel document encoding and differentiable masked attention (tiny Llama)."""

from __future__ import annotations

import math

import pytest
import torch

from grerank.decoder_reader import DecoderReader
from grerank.masked_attention import concat_documents, grouped_causal_mask, scaled_value_attention
from grerank.passage import Passage

PASSAGES = [
    Passage("Alpha", "The alpha river flows north to the cold sea."),
    Passage("Beta", "Beta is a small town known for its glass."),
    Passage("Gamma", "Gamma rays are produced by radioactive decay of nuclei."),
]


@pytest.fixture(scope="module")
def reader(tiny_llama_dir) -> DecoderReader:
    return DecoderReader.from_pretrained(tiny_llama_dir)


def test_hard_mask_equals_reading_only_the_selected_documents(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES)
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    masked = reader.answer_nll(["where does it flow?"], ["north"], [states], mask)
    only = reader.answer_nll(["where does it flow?"], ["north"], [[states[0], states[2]]], torch.ones(1, 2))
    assert torch.allclose(masked, only, atol=1e-5)


def test_one_document_equals_the_plain_concatenated_prompt(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES[1:2])
    nll = reader.answer_nll(["what is beta known for?"], ["glass"], [states], torch.ones(1, 1))
    q = reader._question_ids("what is beta known for?")
    a = reader._ids(reader.prompt.answer.format(answer="glass"))
    ids = reader.prefix_ids + reader.document_ids(PASSAGES[1])
    full = torch.tensor([ids + q + a])
    with torch.no_grad():
        logprobs = torch.log_softmax(reader.model(full).logits[0, :-1].float(), -1)
    token_lp = logprobs.gather(1, full[0, 1:, None])[:, 0]
    start = len(ids) + len(q) - 1
    assert nll.item() == pytest.approx(-token_lp[start : start + len(a)].mean().item(), abs=1e-5)


def test_streamed_answer_equals_greedy_generate_on_the_concatenated_prompt(reader: DecoderReader) -> None:
    question = "what is beta known for?"
    streamed = "".join(reader.stream_answer(question, reader.encode_documents(PASSAGES[1:2]), 8))
    ids = reader.prefix_ids + reader.document_ids(PASSAGES[1]) + reader._question_ids(question)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = reader.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
            eos_token_id=sorted(reader.eos_ids), pad_token_id=0,
        )  # fmt: skip
    new = [t for t in out[0, len(ids) :].tolist() if t not in reader.eos_ids]
    expected = reader.tokenizer.decode(new, skip_special_tokens=True)
    if reader.prompt.stop:
        expected = expected.split(reader.prompt.stop)[0]
    assert new and streamed == expected


def test_batched_states_match_each_document_alone_up_to_rounding(reader: DecoderReader) -> None:
    alone = reader.encode_documents(PASSAGES[2:])[0]
    together = reader.encode_documents(PASSAGES, batch_size=len(PASSAGES))[2]
    assert torch.allclose(alone, together, atol=1e-5)


def test_soft_mask_gets_a_gradient_and_batches_agree(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES)
    mask = torch.tensor([[0.9, 0.3, 0.5], [0.2, 0.8, 0.4]], requires_grad=True)
    nll = reader.answer_nll(["q one", "question two is longer"], ["a", "bb cc"], [states, states[::-1]], mask)
    nll.sum().backward()
    assert mask.grad is not None and torch.all(mask.grad != 0)
    single = reader.answer_nll(["question two is longer"], ["bb cc"], [states[::-1]], mask[1:].detach())
    assert torch.allclose(nll[1].detach(), single, atol=1e-5)


def test_scaled_value_attention_equals_eager_attention_under_the_bias(reader: DecoderReader) -> None:
    """The training path's attention (values scaled by the mask, grouped-query heads folded, no bias to
    differentiate) gives eager attention's likelihoods and mask gradients: soft, hard and padded masks."""
    states = reader.encode_documents(PASSAGES)
    questions, answers = ["where does it flow?", "what is beta known for, in glass?"], ["north", "glass"]
    docs = [states, states[:2]]  # ragged: the second example's keys end in padding
    for values in ([[0.9, 1e-3, 0.5], [0.2, 0.8, 0.0]], [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]):
        results = []
        for implementation in ("scaled", "eager"):
            mask = torch.tensor(values, requires_grad=True)
            if implementation == "scaled":
                ll, _ = reader.answer_log_likelihood(questions, answers, docs, mask)
            else:
                ll = _eager_log_likelihood(reader, questions, answers, docs, mask)
            ll.sum().backward()
            results.append((ll.detach(), mask.grad))
        (ll, grad), (eager_ll, eager_grad) = results
        assert torch.allclose(ll, eager_ll, atol=1e-5)
        # Where M > 0; at M == 0 eager's -inf has no gradient, the scaled values their one-sided derivative.
        kept = torch.tensor(values) > 0
        assert torch.allclose(grad[kept], eager_grad[kept], atol=1e-5, rtol=1e-4)
        assert torch.all(grad[kept] != 0)


def test_scaled_value_attention_gradients_are_exact() -> None:
    """The hand-written backward (weights recomputed from each row's maximum and normaliser) against finite
    differences, in float64, for queries, keys, values and the per-key scale (zeros and padding included)."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, keys, width = 2, 4, 2, 3, 7, 5
    query = torch.randn(batch, heads, length, width, dtype=torch.float64, generator=generator)
    key, value = (
        torch.randn(batch, kv_heads, keys, width, dtype=torch.float64, generator=generator) for _ in "kv"
    )
    scale = torch.rand(batch, keys, dtype=torch.float64, generator=generator)
    scale[0, 1] = scale[1, 2] = 0.0
    mask = grouped_causal_mask(length, keys, heads // kv_heads, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (query, key, value, scale))
    assert torch.autograd.gradcheck(lambda q, k, v, s: scaled_value_attention(q, k, v, s, mask, 0.7), inputs)


def _eager_log_likelihood(reader: DecoderReader, questions, answers, docs, mask) -> torch.Tensor:
    """``answer_log_likelihood``'s sums through eager attention (the path that returns attention weights)."""
    out, ids, target, _ = reader._answer_forward(questions, answers, docs, mask, output_attentions=True)
    logits = reader.model.get_output_embeddings()(out.last_hidden_state).float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    return (logprobs * target).sum(dim=1)


def test_generation_stops_within_budget(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES)
    text = reader.generate("where?", states, max_new_tokens=5)
    assert isinstance(text, str) and len(reader._ids(text)) <= 6


def test_document_attention_matches_uniform_attention_by_hand(copy_reader_dir) -> None:
    # The copy reader's query and key projections are zero, so every key visible from the position that
    # predicts the first answer token gets the same weight, 1 / (prefix + documents + question): a document's
    # mean log weight is the same whatever its length (a sum over its tokens would grow with it).
    reader = DecoderReader.from_pretrained(copy_reader_dir)
    passages = [PASSAGES[0], Passage("Delta", "The delta river flows south " * 4), Passage("E", "north")]
    states = reader.encode_documents(passages)
    lengths = [s.shape[-2] for s in states]
    assert len(set(lengths)) == 3
    score = reader.document_attention(["where does it flow?"], ["north"], [states])[0]
    visible = len(reader.prefix_ids) + sum(lengths) + len(reader._question_ids("where does it flow?"))
    assert score.tolist() == pytest.approx([-math.log(visible)] * 3, rel=1e-4)
    assert reader.model.config._attn_implementation == "sdpa"  # switched back after reading the weights


@pytest.mark.parametrize("seq_dim, batch_dim", [(-2, 2), (0, 0)])
def test_concat_documents_lays_states_end_to_end_and_pads_with_zeros(seq_dim: int, batch_dim: int) -> None:
    def states(length: int, fill: float) -> torch.Tensor:  # [layers, 2, heads, L, d] or [L, d]
        return torch.full((3, 2, 2, length, 4) if seq_dim == -2 else (length, 4), fill)

    lead = states(2, -1.0)
    docs = [[states(3, 1.0), states(1, 2.0)], [states(2, 3.0)]]
    out, key_index = concat_documents(docs, seq_dim=seq_dim, batch_dim=batch_dim, lead=lead)
    assert key_index.tolist() == [[-1, -1, 0, 0, 0, 1], [-1, -1, 0, 0, -2, -2]]
    seq = out.dim() + seq_dim if seq_dim < 0 else seq_dim + 1  # the batch dimension comes before it
    assert out.shape[batch_dim] == 2 and out.shape[seq] == 6
    expected_rows = torch.tensor([[-1.0, -1, 1, 1, 1, 2], [-1.0, -1, 3, 3, 0, 0]])
    for b, expected in enumerate(expected_rows):
        values = out.select(batch_dim, b).movedim(seq - 1, 0).reshape(6, -1)
        assert torch.equal(values, expected[:, None].expand_as(values))
