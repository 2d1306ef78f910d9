"""The real default models load offline from their PyPI packages and behave."""

from __future__ import annotations

import pytest
import torch

from grerank import model_paths
from grerank.decoder_reader import DecoderReader
from grerank.doc_state_cache import DocStateCache
from grerank.passage import Passage
from grerank.qa_data import load_examples, split_path
from grerank.readers import load_reader
from grerank.sentence_encoder import SentenceEncoder

pytestmark = pytest.mark.real_models


def test_embedder_ranks_a_paraphrase_above_an_unrelated_sentence() -> None:
    encoder = SentenceEncoder.from_pretrained(model_paths.resolve("embedder"))
    query, paraphrase, unrelated = encoder.encode(
        [
            "How tall is the Eiffel Tower?",
            "What is the height of the Eiffel Tower?",
            "Bananas are rich in potassium.",
        ]
    )
    assert query @ paraphrase > query @ unrelated + 0.3


def test_reader_is_more_confident_given_the_document_that_holds_the_answer() -> None:
    reader = DecoderReader.from_pretrained(model_paths.resolve("reader"))
    assert reader.family == "decoder" and reader.model.config.model_type == "llama"
    holding = Passage(
        "Tinted Windows (band)", "Tinted Windows played their first show in Tulsa, Oklahoma in 2009."
    )
    unrelated = Passage("Potassium", "Potassium is a chemical element with the symbol K.")
    states = reader.encode_documents([holding, unrelated])
    question = "In what city did the band Tinted Windows play their first show?"
    nll = [reader.answer_nll([question], ["Tulsa"], [[s]], torch.ones(1, 1)).item() for s in states]
    assert nll[0] < nll[1] - 1.0  # more than e times likelier with the right document


def test_a_missing_model_names_what_to_install(tmp_path) -> None:
    with pytest.raises(model_paths.ModelNotAvailable, match="not a local folder"):
        model_paths.resolve("reader", "no-such-model")
    with pytest.raises(model_paths.ModelNotAvailable, match="config.json"):
        model_paths.resolve("embedder", tmp_path)


def test_cached_states_do_not_depend_on_which_documents_missed_together() -> None:
    """Batched bf16 GEMMs round a document's states differently from its own (enough to change greedy
    answers), so the cache encodes each miss alone: the same bits whatever else missed with it."""
    reader = load_reader(model_paths.resolve("reader"), "decoder", "cpu", torch.bfloat16)
    passages = load_examples(split_path("dev"), limit=1)[0].passages
    together = DocStateCache(reader, 1 << 30).states(passages)
    alone = DocStateCache(reader, 1 << 30).states(passages[3:4])[0]
    assert torch.equal(together[3], alone)
