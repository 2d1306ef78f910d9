"""Question-to-document attention from the reader's cached states (grerank.question_attention), against the
model's own eager attention weights (tiny Llama)."""

from __future__ import annotations

import pytest
import torch

from grerank.decoder_reader import DecoderReader
from grerank.passage import Passage
from grerank.question_attention import calibrated_attention, head_scores, icr_scores, question_attention

PASSAGES = [
    Passage("Alpha", "The alpha river flows north to the cold sea."),
    Passage("Beta", "Beta is a small town known for its glass."),
    Passage("Gamma", "Gamma rays come from the decay of nuclei, the oldest and coldest of them."),
]


@pytest.fixture(scope="module")
def reader(tiny_llama_dir) -> DecoderReader:
    return DecoderReader.from_pretrained(tiny_llama_dir)


def test_scores_equal_the_eager_attention_of_the_question_tokens(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES)
    question = "where does the river flow?"
    scores = question_attention(reader, question, states)
    assert [s.shape[-1] for s in scores] == [s.shape[-2] for s in states]
    config = reader.model.config
    assert all(s.shape[:2] == (config.num_hidden_layers, config.num_attention_heads) for s in scores)

    # Brute force: the whole model in eager attention with output_attentions, question and (empty) answer;
    # the question's rows do not see the answer tokens after them, so they are the question pass's rows.
    mask = torch.ones(1, len(PASSAGES))
    out, _, _, key_index = reader._answer_forward([question], [""], [states], mask, output_attentions=True)
    width = len(reader._question_ids(question))
    eager = torch.stack(out.attentions)[:, 0, :, :width, : key_index.shape[1]].float().mean(dim=2)
    for i, score in enumerate(scores):
        assert torch.allclose(score, eager[..., key_index[0] == i], atol=1e-6)
    # Weights: what the documents get is a share of each question token's attention (at most all of it).
    total = sum(s.sum(dim=-1) for s in scores)
    assert bool(((total > 0) & (total <= 1 + 1e-6)).all())


def test_scores_are_deterministic_and_depend_on_the_question(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES)
    first = question_attention(reader, "where does the river flow?", states)
    again = question_attention(reader, "where does the river flow?", states)
    other = question_attention(reader, "what is beta known for?", states)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.allclose(a, b) for a, b in zip(first, other, strict=True))


def test_icr_over_all_heads_equals_every_head_selected(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES)
    config = reader.model.config
    every = torch.ones(config.num_hidden_layers, config.num_attention_heads, dtype=torch.bool)
    question = "where does the river flow?"
    assert torch.equal(icr_scores(reader, question, states), icr_scores(reader, question, states, every))
    one = torch.zeros_like(every)
    one[1, 2] = True
    # One head, no calibration, no token dropped by the filter: that head's attention mass per document.
    single = icr_scores(reader, question, states, one, calibrate=False)
    mass = head_scores(reader, question, states, calibrate=False)[1, 2]
    assert bool((single <= mass + 1e-7).all()) and bool((single >= 0).all())


def test_calibrating_against_the_question_itself_gives_zero(reader: DecoderReader) -> None:
    states = reader.encode_documents(PASSAGES)
    question = "where does the river flow?"
    for tokens in calibrated_attention(reader, question, states, null_question=question):
        assert torch.equal(tokens, torch.zeros_like(tokens))
    calibrated = head_scores(reader, question, states)
    raw = head_scores(reader, question, states, calibrate=False)
    assert calibrated.shape == raw.shape and not torch.allclose(calibrated, raw)
