"""The trained reader (training.train_reader, grerank.reader_adapter, grerank.reader_artifact) and the LoRA
reranker artifact, on tiny random models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from grerank.artifact import load_artifact, write_artifact
from grerank.checksums import ArtifactError
from grerank.decoder_reader import DecoderReader
from grerank.passage import Passage
from grerank.qa_data import load_examples
from grerank.reader_adapter import add_lora
from grerank.reader_artifact import load_reader_artifact, write_reader_artifact
from grerank.reranker import build_reranker
from tests.synthetic_qa import synthetic_split
from tests.uvicorn_server import Server, tiny_env
from training import train_reader

PASSAGES = [Passage("Alpha", "The alpha river flows north."), Passage("Beta", "Beta is a town of glass.")]


def perturbed_lora(reader: DecoderReader, seed: int = 0) -> None:
    """An adapter whose B matrices are non-zero, so it changes whatever it acts on."""
    reader.adapter = add_lora(reader.model, rank=4, alpha=8.0, dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reader.adapter.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    reader.model.eval()


def other_base(base: Path, folder: Path) -> Path:
    """A base reader of the same architecture with other weights."""
    reader = DecoderReader.from_pretrained(base)
    with torch.no_grad():
        reader.model.get_input_embeddings().weight.add_(0.01)
    reader.model.save_pretrained(folder)
    reader.tokenizer.save_pretrained(folder)
    return folder


def test_the_adapter_leaves_document_states_bit_identical_and_changes_answers(tiny_llama_dir: Path) -> None:
    reader = DecoderReader.from_pretrained(tiny_llama_dir)
    base_states = reader.encode_documents(PASSAGES)
    base_nll = reader.answer_nll(["Which river?"], ["alpha"], [base_states], torch.ones(1, 2))
    perturbed_lora(reader)
    reader._prefix_states = None  # recomputed with the adapter in place
    states = reader.encode_documents(PASSAGES)
    assert all(torch.equal(a, b) for a, b in zip(states, base_states, strict=True))
    nll = reader.answer_nll(["Which river?"], ["alpha"], [states], torch.ones(1, 2))
    assert not torch.allclose(nll, base_nll)  # the question and answer tokens do go through the adapter


def test_a_reader_artifact_is_verified_against_its_files_and_its_base(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    reader = DecoderReader.from_pretrained(tiny_llama_dir)
    perturbed_lora(reader)
    expected = reader.answer_nll(
        ["Which river?"], ["alpha"], [reader.encode_documents(PASSAGES)], torch.ones(1, 2)
    )
    folder = write_reader_artifact(
        tmp_path / "reader", reader, str(tiny_llama_dir), hyperparameters={"rank": 4}
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "reader" and manifest["base_model"]["spec"] == str(tiny_llama_dir)
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}

    loaded, _ = load_reader_artifact(folder)
    assert loaded.adapter_id == manifest["files"]["adapter_model.safetensors"]
    got = loaded.answer_nll(
        ["Which river?"], ["alpha"], [loaded.encode_documents(PASSAGES)], torch.ones(1, 2)
    )
    torch.testing.assert_close(got, expected)
    # Generation runs through a merged copy of the weights: the same answers as the adapter gives.
    states = loaded.encode_documents(PASSAGES)
    merged = loaded.generate("Which river?", states, 6)
    loaded.answer_model = None
    assert loaded.generate("Which river?", states, 6) == merged

    other = other_base(tiny_llama_dir, tmp_path / "other-base")
    with pytest.raises(ArtifactError, match="trained over base weights"):
        load_reader_artifact(folder, str(other))
    with pytest.raises(ArtifactError, match="is a reader artifact, not a reranker"):
        load_artifact(folder)


def test_the_service_refuses_a_reader_artifact_that_does_not_match(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    reader = DecoderReader.from_pretrained(tiny_llama_dir)
    perturbed_lora(reader)
    good = write_reader_artifact(tmp_path / "reader", reader, str(tiny_llama_dir), hyperparameters={})
    other = other_base(tiny_llama_dir, tmp_path / "other-base")
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    with (tampered / "adapter_config.json").open("a") as fh:
        fh.write(" ")

    cases = [
        (str(tiny_llama_dir), tampered, "checksum mismatch for adapter_config.json"),
        (str(other), good, "trained over base weights"),
    ]
    for base, artifact, reason in cases:
        env = tiny_env(tiny_bert_dir, Path(base), tmp_path / "index") | {
            "GRERANK_READER_ARTIFACT": str(artifact)
        }
        server = Server(env, tmp_path / "server.log").start()
        try:
            readyz = server.wait_failed()
            body = readyz.json()
            assert readyz.status_code == 503 and body["components"]["reader"] == "failed"
            assert reason in body["reason"], body["reason"]
        finally:
            server.stop()

    env = tiny_env(tiny_bert_dir, tiny_llama_dir, tmp_path / "index2") | {
        "GRERANK_READER_ARTIFACT": str(good)
    }
    server = Server(env, tmp_path / "good.log").start()
    try:
        ready = server.wait_ready().wait_until("/readyz", 200).json()
        assert ready["reader"] == "trained artifact" and ready["models"]["reader"] == str(good)
        info = httpx.get(server.url + "/info").json()["models"]["reader"]
        assert (
            info["manifest"]["base_model"]["spec"] == str(tiny_llama_dir) and "files" not in info["manifest"]
        )
    finally:
        server.stop()


def test_training_a_few_steps_lowers_the_answer_loss(
    tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    split = synthetic_split(tmp_path / "train.jsonl", 8, 4, seed=3)
    out = tmp_path / "run"
    common = [
        "--train", str(split), "--dev", str(split), "--dev-questions", "2", "--reader", str(tiny_llama_dir),
        "--ranker", str(tiny_bert_dir), "--precision", "fp32", "--epochs", "4", "--lr", "1e-2", "--rank", "8",
        "--batch-size", "4", "--grad-accum", "1", "--state-cache-dir", str(tmp_path / "states"),
        "--out", str(out),
    ]  # fmt: skip
    result = train_reader.main(common)
    examples = load_examples(split)

    def mean_nll(reader: DecoderReader) -> float:
        states = [reader.encode_documents(ex.passages) for ex in examples]
        mask = torch.ones(len(examples), 4)
        return (
            reader.answer_nll([ex.question for ex in examples], [ex.answer for ex in examples], states, mask)
            .mean()
            .item()
        )

    trained, manifest = load_reader_artifact(result["artifact"])
    assert mean_nll(trained) < mean_nll(DecoderReader.from_pretrained(tiny_llama_dir)) - 0.5
    assert manifest["training"]["updates"] == 8 and manifest["data"]["train_questions"] == 8
    assert set(manifest["metrics"]["dev"]) == {"all", "oracle", "questions"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["type"] for e in log][0] == "encode" and log[-1]["type"] == "eval"

    # A resumed run that had finished trains nothing more and writes the same adapter.
    again = train_reader.main([*common, "--resume", "--artifact", str(tmp_path / "again")])
    first = json.loads((Path(result["artifact"]) / "manifest.json").read_text())["files"]
    assert json.loads((Path(again["artifact"]) / "manifest.json").read_text())["files"] == first


def test_a_lora_reranker_artifact_holds_the_adapter_and_serves_merged(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    reranker = build_reranker("bi-encoder", tiny_bert_dir)
    reranker.add_lora(str(tiny_bert_dir), rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in reranker.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    documents = ["the alpha river", "a town of glass", "prime numbers"]
    expected = reranker.predict("which river?", documents)
    assert not torch.allclose(
        expected, build_reranker("bi-encoder", tiny_bert_dir).predict("which river?", documents)
    )
    folder = write_artifact(tmp_path / "artifact", reranker, hyperparameters={})
    assert not list(folder.glob("model.safetensors")) and (folder / "adapter_model.safetensors").is_file()
    loaded, manifest = load_artifact(folder)
    assert manifest["reranker"]["adapter_base"]["spec"] == str(tiny_bert_dir)
    assert not any("lora" in name for name, _ in loaded.named_parameters())  # merged into plain weights
    torch.testing.assert_close(loaded.predict("which river?", documents), expected, atol=1e-5, rtol=1e-5)
