"""The FiD reader: independently encoded (question, passage) pairs and DMA in cross-attention (tiny T5)."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from grerank.fid_reader import FiDReader
from grerank.passage import Passage

PASSAGES = [
    Passage("Alpha", "The alpha river flows north to the cold sea."),
    Passage("Beta", "Beta is a small town known for its glass, its old stone bridges and its market."),
    Passage("Gamma", "Gamma rays come from decay."),
]


@pytest.fixture(scope="module")
def reader(tiny_t5_dir) -> FiDReader:
    return FiDReader.from_pretrained(tiny_t5_dir)


def test_hard_mask_equals_reading_only_the_selected_documents(reader: FiDReader) -> None:
    states = reader.encode_documents(PASSAGES, "where does it flow?")
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    masked = reader.answer_nll(["where does it flow?"], ["north"], [states], mask)
    only = reader.answer_nll(["where does it flow?"], ["north"], [[states[0], states[2]]], torch.ones(1, 2))
    assert torch.allclose(masked, only, atol=1e-5)


def test_one_document_equals_the_plain_fid_forward(reader: FiDReader) -> None:
    question = "what is beta known for?"
    states = reader.encode_documents(PASSAGES[1:2], question)
    nll = reader.answer_nll([question], ["glass"], [states], torch.ones(1, 1))
    ids = torch.tensor([reader.document_ids(PASSAGES[1], question)])
    labels = torch.tensor([reader.answer_ids("glass")])
    with torch.no_grad():
        loss = reader.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    assert nll.item() == pytest.approx(loss.item(), abs=1e-5)


def test_batched_states_match_each_document_alone_up_to_rounding(reader: FiDReader) -> None:
    alone = reader.encode_documents(PASSAGES[2:], "q")[0]
    together = reader.encode_documents(PASSAGES, "q", batch_size=len(PASSAGES))[2]
    assert alone.shape == together.shape and torch.allclose(alone, together, atol=1e-5)


def test_soft_mask_gets_a_gradient_and_batches_agree(reader: FiDReader) -> None:
    first = reader.encode_documents(PASSAGES, "q one")
    second = reader.encode_documents(PASSAGES[::-1], "question two is longer")
    mask = torch.tensor([[0.9, 0.3, 0.5], [0.2, 0.8, 0.4]], requires_grad=True)
    nll = reader.answer_nll(["q one", "question two is longer"], ["a", "bb cc"], [first, second], mask)
    nll.sum().backward()
    assert mask.grad is not None and torch.all(mask.grad != 0)
    single = reader.answer_nll(["question two is longer"], ["bb cc"], [second], mask[1:].detach())
    assert torch.allclose(nll[1].detach(), single, atol=1e-5)


def test_an_example_without_documents_is_refused(reader: FiDReader) -> None:
    states = reader.encode_documents(PASSAGES[:2], "q")
    with pytest.raises(ValueError):
        reader.answer_nll(["q"], ["a"], [states], torch.zeros(1, 2))


def test_generation_stops_within_budget(reader: FiDReader) -> None:
    states = reader.encode_documents(PASSAGES, "where?")
    text = reader.generate("where?", states, max_new_tokens=5)
    assert isinstance(text, str) and len(reader.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 5
    greedy = reader.model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=torch.cat(states)[None]),
        max_new_tokens=5,
        do_sample=False,
        num_beams=1,
    )
    assert text == reader.tokenizer.decode(greedy[0], skip_special_tokens=True).strip()
