"""G-Rerank training: gradients reach the reranker, the cache changes nothing, and training learns.

The learning test uses the synthetic task and the tiny copying reader of ``tests/synthetic_qa.py``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grerank.artifact import load_artifact
from grerank.decoder_reader import DecoderReader
from grerank.doc_state_cache import DocStateCache
from grerank.reranker import build_reranker
from tests.synthetic_qa import synthetic_split
from training import train as training


def test_copy_reader_prefers_the_answer_document(copy_reader_dir: Path, tmp_path: Path) -> None:
    from grerank.qa_data import load_examples

    example = load_examples(synthetic_split(tmp_path / "s.jsonl", 1, 4, seed=3))[0]
    reader = DecoderReader.from_pretrained(copy_reader_dir)
    states = reader.encode_documents(example.passages)
    target = example.supporting.index(True)
    nll = [
        reader.answer_nll([example.question], [example.answer], [states], torch.eye(4)[i : i + 1]).item()
        for i in range(4)
    ]
    assert min(range(4), key=nll.__getitem__) == target


def test_gradients_reach_the_reranker_and_cache_changes_no_loss(
    copy_reader_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from grerank.qa_data import load_examples

    batch = load_examples(synthetic_split(tmp_path / "s.jsonl", 3, 4, seed=1))
    reader = DecoderReader.from_pretrained(copy_reader_dir)
    reranker = build_reranker("bi-encoder", tiny_bert_dir)
    args = training.parse_args(["--candidates", "4", "--k", "2", "--anchor-weight", "0"])
    losses = []
    for cache in (
        DocStateCache(reader, memory_bytes=1 << 30),
        None,
        DocStateCache(reader, memory_bytes=0, disk_dir=tmp_path, disk_bytes=1 << 30),
    ):
        reranker.zero_grad()
        loss, _ = training.batch_loss(
            batch, reranker, reader, cache, args, torch.Generator().manual_seed(0), {}, {}, None
        )
        if cache is not None:  # a second pass reads what the first stored (memory, or disk past the budget)
            loss, _ = training.batch_loss(
                batch, reranker, reader, cache, args, torch.Generator().manual_seed(0), {}, {}, None
            )
            assert cache.hits + cache.disk_hits == 4 * len(batch)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[2] == pytest.approx(losses[1], abs=1e-6)
    grads = [p.grad for p in reranker.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0


def reader_batch(reader_dir: Path, tmp_path: Path) -> tuple[DecoderReader, list, list, list]:
    """A tiny reader and two synthetic questions of four documents: questions, answers, document states."""
    from grerank.qa_data import load_examples

    batch = load_examples(synthetic_split(tmp_path / "s.jsonl", 2, 4, seed=1))
    reader = DecoderReader.from_pretrained(reader_dir)
    states = [reader.encode_documents(ex.passages) for ex in batch]
    return reader, [ex.question for ex in batch], [ex.answer for ex in batch], states


def test_more_mask_draws_average_the_loss_over_independent_masks(
    copy_reader_dir: Path, tmp_path: Path
) -> None:
    from grerank.gumbel_topk import relaxed_topk_mask
    from training.objectives import grerank_nll

    reader, questions, answers, states = reader_batch(copy_reader_dir, tmp_path)
    scores = torch.randn(2, 4)
    loss = grerank_nll(
        scores, reader, questions, answers, states, 2, 0.5, 1.0, torch.Generator().manual_seed(0), 3
    )
    # The same masks, drawn the same way: three per question, each question's rows together.
    masks = relaxed_topk_mask(scores.repeat_interleave(3, 0), 2, 0.5, 1.0, torch.Generator().manual_seed(0))
    assert not torch.allclose(masks[0], masks[1])  # independent draws, not one mask three times
    each = [
        reader.answer_nll(
            [questions[row // 3]], [answers[row // 3]], [states[row // 3]], masks[row : row + 1]
        )
        for row in range(6)
    ]
    assert loss.item() == pytest.approx(torch.cat(each).mean().item(), abs=1e-5)
    one = grerank_nll(
        scores, reader, questions, answers, states, 2, 0.5, 1.0, torch.Generator().manual_seed(0)
    )
    assert one.item() != pytest.approx(loss.item(), abs=1e-6)


def test_nested_loss_averages_the_top_1_and_top_2_of_the_same_draws(
    copy_reader_dir: Path, tmp_path: Path
) -> None:
    from training.objectives import grerank_nll

    reader, questions, answers, states = reader_batch(copy_reader_dir, tmp_path)
    scores = torch.randn(2, 4)

    def loss(k: int, nested: bool = False) -> float:  # the first k draws of seed 0 are the same for any k
        generator = torch.Generator().manual_seed(0)
        return grerank_nll(scores, reader, questions, answers, states, k, 0.5, 1.0, generator, nested=nested)

    top1, top2 = loss(1).item(), loss(2).item()
    assert top1 != pytest.approx(top2, abs=1e-4)
    assert loss(2, nested=True).item() == pytest.approx((top1 + top2) / 2, abs=1e-5)
    assert loss(1, nested=True).item() == pytest.approx(top1, abs=1e-6)


def test_nested_expected_loss_reads_one_signal_per_level(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from grerank.qa_data import load_examples
    from training import objectives

    assert objectives.signal_kinds("expected", 2, nested=True) == ["subset_nll_k1", "subset_nll_k2"]
    assert objectives.signal_kinds("pdist", 2, nested=True) == ["loglik"]
    assert objectives.signal_kinds("grerank", 2) == []
    batch = load_examples(synthetic_split(tmp_path / "s.jsonl", 2, 4, seed=1))
    reranker = build_reranker("bi-encoder", tiny_bert_dir)
    signals = {
        "subset_nll_k1": {ex.id: torch.rand(4) for ex in batch},
        "subset_nll_k2": {ex.id: torch.rand(6) for ex in batch},
    }
    base = ["--objective", "expected", "--candidates", "4", "--k", "2", "--anchor-weight", "0"]
    cpu_reader = SimpleNamespace(device=torch.device("cpu"))  # the exact loss reads only cached signals
    losses = {}
    for name, extra in (("k2", []), ("nested", ["--nested"]), ("k1", ["--k", "1"])):
        args = training.parse_args(base + extra)
        with torch.no_grad():
            loss, _ = training.batch_loss(batch, reranker, cpu_reader, None, args, None, {}, signals, None)
        losses[name] = loss.item()
    assert losses["nested"] == pytest.approx((losses["k1"] + losses["k2"]) / 2, rel=1e-5)


def test_grerank_lifts_answer_recall_from_chance_to_near_one(
    copy_reader_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    train_file = synthetic_split(tmp_path / "train.jsonl", 48, 4, seed=0)
    dev_file = synthetic_split(tmp_path / "dev.jsonl", 40, 4, seed=99)
    summary = training.main(
        [
            "--train", str(train_file), "--dev", str(dev_file), "--candidates", "4", "--k", "1",
            "--reranker", str(tiny_bert_dir), "--reranker-arch", "cross-encoder",
            "--reader", str(copy_reader_dir),
            "--tau", "0.5", "--kappa", "1", "--lr", "3e-3", "--epochs", "6", "--batch-size", "4",
            "--precision", "fp32", "--dev-reader-questions", "20", "--select-by", "answer_recall@1",
            "--out", str(tmp_path / "run"), "--state-cache-dir", str(tmp_path / "states"),
        ]
    )  # fmt: skip
    start = summary["start"]["summary"]["answer_recall@1"]
    best = summary["best"]["summary"]["answer_recall@1"]
    assert start < 50  # chance is 25 with 4 candidates
    assert best >= 90
    assert (tmp_path / "run" / "artifact" / "manifest.json").is_file()


def test_resume_continues_from_the_checkpoint(
    copy_reader_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    data = synthetic_split(tmp_path / "train.jsonl", 8, 4, seed=0)
    common = [
        "--train", str(data), "--dev", str(data), "--candidates", "4", "--k", "1",
        "--reranker", str(tiny_bert_dir), "--reader", str(copy_reader_dir), "--precision", "fp32",
        "--batch-size", "4", "--dev-reader-questions", "4", "--out", str(tmp_path / "run"),
        "--state-cache-dir", str(tmp_path / "states"),
    ]  # fmt: skip
    first = training.main([*common, "--epochs", "1"])
    assert [h["update"] for h in first["history"] if h["type"] == "train"] == [1, 2]
    resumed = training.main([*common, "--epochs", "2", "--resume"])
    updates = [h["update"] for h in resumed["history"] if h["type"] == "train"]
    assert updates == [1, 2, 3, 4]  # the first epoch is not repeated
    manifest = json.loads((tmp_path / "run" / "artifact" / "manifest.json").read_text())
    assert manifest["training"]["updates"] == 4
    # Resuming a finished run only rewrites the artifact: --mix-start 1 gives back the starting weights.
    mix = ["--mix-start", "1", "--artifact", str(tmp_path / "m")]
    training.main([*common, "--epochs", "2", "--resume", *mix])
    start = build_reranker("bi-encoder", tiny_bert_dir).state_dict()
    mixed, manifest = load_artifact(tmp_path / "m")
    assert manifest["hyperparameters"]["mix_start"] == 1.0
    assert all(torch.equal(v, start[k]) for k, v in mixed.state_dict().items())


def test_mixing_interpolates_floating_weights_and_keeps_integer_buffers() -> None:
    trained = {"w": torch.tensor([1.0, 3.0]), "ids": torch.tensor([0, 1])}
    start = {"w": torch.tensor([3.0, 7.0]), "ids": torch.tensor([5, 5])}
    assert training.mixed(trained, start, 0.0) is trained
    half = training.mixed(trained, start, 0.5)
    assert torch.equal(half["w"], torch.tensor([2.0, 5.0])) and torch.equal(half["ids"], trained["ids"])
    assert torch.equal(training.mixed(trained, start, 1.0)["w"], start["w"])


@pytest.mark.parametrize("objective", ["pdist", "emdr", "loop", "supervised", "expected"])
def test_baselines_learn_the_synthetic_task(
    objective: str, copy_reader_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    train_file = synthetic_split(tmp_path / "train.jsonl", 48, 4, seed=0)
    dev_file = synthetic_split(tmp_path / "dev.jsonl", 40, 4, seed=99)
    summary = training.main(
        [
            "--objective", objective, "--anchor-weight", "0",
            "--train", str(train_file), "--dev", str(dev_file), "--candidates", "4",
            "--reranker", str(tiny_bert_dir), "--reranker-arch", "cross-encoder",
            "--reader", str(copy_reader_dir), "--kappa", "1", "--lr", "3e-3", "--epochs", "6",
            "--precision", "fp32", "--dev-reader-questions", "0", "--select-by", "answer_recall@1",
            "--out", str(tmp_path / "run"), "--state-cache-dir", str(tmp_path / "states"),
        ]
    )  # fmt: skip
    assert summary["start"]["summary"]["answer_recall@1"] < 50
    assert summary["best"]["summary"]["answer_recall@1"] >= 90


def test_reader_signals_are_computed_once_and_stored(copy_reader_dir: Path, tmp_path: Path) -> None:
    from grerank.qa_data import load_examples
    from training.reader_signals import reader_signals

    examples = load_examples(synthetic_split(tmp_path / "s.jsonl", 5, 4, seed=2))
    cache = DocStateCache(DecoderReader.from_pretrained(copy_reader_dir), memory_bytes=1 << 30)
    store = tmp_path / "signals.jsonl"
    loglik = reader_signals(examples, cache, "loglik", store, progress=False)
    attention = reader_signals(examples, cache, "attention_score", store, progress=False)
    left_out = reader_signals(examples, cache, "loo_loglik", store, progress=False)
    subsets = reader_signals(examples, cache, "subset_nll_k2", store, progress=False)
    lines = store.read_text().count("\n")
    assert (
        lines == 20
        and reader_signals(examples, cache, "loglik", store, progress=False).keys() == loglik.keys()
    )
    assert store.read_text().count("\n") == lines  # read back, not recomputed
    for ex in examples:  # the copying reader: the answer is likeliest given the document that holds it
        assert int(loglik[ex.id].argmax()) == ex.supporting.index(True)
        assert int(left_out[ex.id].argmin()) == ex.supporting.index(True)  # and least likely without it
        assert attention[ex.id].shape == (4,) and bool(torch.isfinite(attention[ex.id]).all())
        # Every pair of the 4 candidates, read alone: those with the answer's document are the likeliest, and
        # each equals reading all four under the pair's hard mask.
        answer, pairs = ex.supporting.index(True), list(itertools.combinations(range(4), 2))
        best = {i for i, pair in enumerate(pairs) if answer in pair}
        assert set(subsets[ex.id].argsort()[:3].tolist()) == best
        states = cache.states(ex.passages, ex.question)
        mask = torch.zeros(len(pairs), 4)
        for row, pair in enumerate(pairs):
            mask[row, list(pair)] = 1.0
        masked = cache.reader.answer_nll([ex.question] * 6, [ex.answer] * 6, [states] * 6, mask)
        assert torch.allclose(subsets[ex.id], masked.float(), atol=1e-4)


def test_supervised_loss_ranks_within_a_question_whatever_the_score_level() -> None:
    from training.objectives import supervised_loss

    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    right, wrong = torch.tensor([[0.6, 0.1, 0.2, 0.5]]), torch.tensor([[0.1, 0.6, 0.5, 0.2]])
    assert supervised_loss(right, labels, 10.0) < supervised_loss(wrong, labels, 10.0)
    # Shifting every score of a question changes nothing: no reward for lowering all cosines at once.
    assert supervised_loss(right - 0.7, labels, 10.0).item() == pytest.approx(
        supervised_loss(right, labels, 10.0).item()
    )


def test_encoder_training_pass_attends_eagerly_under_bf16_and_embeds_as_inference_does(
    tiny_bert_dir: Path,
) -> None:
    from grerank.sentence_encoder import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(tiny_bert_dir)
    texts = ["a short one", "a much longer text " * 12, "medium length text " * 4, "x"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = encoder(texts)  # gradients on: the training pass
        assert encoder.model.config._attn_implementation == "eager"
        trained.sum().backward()
        with torch.no_grad():
            inferred = encoder(texts)
        assert encoder.model.config._attn_implementation == "sdpa"
    assert torch.allclose(trained.detach(), inferred, atol=2e-2)
    # One embedding lookup for all the length groups: one gradient, on the tokens that were read.
    grad = encoder.model.get_input_embeddings().weight.grad
    assert grad is not None and 0 < int((grad.abs().sum(1) > 0).sum()) < grad.shape[0]
    with torch.no_grad():
        alone = torch.cat([encoder([t]) for t in texts])
        assert torch.allclose(encoder(texts), alone, atol=1e-5)  # fp32: a text's group does not matter
    assert encoder.model.config._attn_implementation == "sdpa"
