"""The rerank batching queue: a request's scores are the same bits alone, batched with others and from the
cache of sequences read before, the backend's packed forward matches Hugging Face's, passes respect the
token budget, the queue is bounded (429), a request's own error reaches that request only (4xx), a stage
over its limit is a 504, and other model work still gets its turn."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, RobertaConfig

from grerank import model_paths, qa_data
from grerank.reranker import CrossEncoderReranker, build_reranker
from service.api.request_limits import RequestRejected
from service.engine import rerank_backend
from service.engine.batching_queue import BatchingQueue, PassPlanner, QueueFull, RerankJob, rerank_inline
from service.engine.model_worker import ModelWorker
from service.engine.rerank_backend import TOKENS_PER_BLOCK, Encoded, RerankBackend
from service.engine.rerank_cache import ENTRY_OVERHEAD_BYTES, RerankCache
from service.engine.stage_timeouts import StageTimeout
from service.engine.truncation import TruncationPolicy
from service.metrics import Metrics
from tests.test_hardening_faults import serving, settings_for

MAX_TOKENS, MAX_ROWS = 512, 16


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    """Real HotpotQA paragraphs of mixed lengths (some past the reranker's 256 tokens), and two tiny texts."""
    passages = [p.as_text() for p in qa_data.corpus()[:400]]
    rng = random.Random(seed)
    return rng.sample(passages, n - 2) + ["x", "a short one " * 3]


REQUESTS = [
    ("Which band released the album and where did they first perform?", corpus_texts(20, 0)),
    ("x", corpus_texts(5, 1)),
    ("long question " * 60, corpus_texts(13, 2)),  # longer than a cross-encoder's query budget
    ("Who founded it?", corpus_texts(31, 3)),
]


@dataclass
class Served:
    backend: RerankBackend
    truncation: TruncationPolicy
    metrics: Metrics
    worker: ModelWorker
    queue: BatchingQueue
    passes: list[list[Encoded]]  # every forward pass, as run


@contextmanager
def queue_for(reranker: torch.nn.Module, dtype: torch.dtype, **limits: float) -> Iterator[Served]:
    """A queue on its own model worker; every forward pass is recorded."""
    backend = RerankBackend(reranker, dtype)
    truncation = TruncationPolicy(reranker, reader=None)
    metrics = Metrics()
    worker = ModelWorker(metrics)
    passes: list[list[Encoded]] = []
    forward = backend.forward

    def recorded(sequences: list[Encoded]) -> torch.Tensor:
        passes.append(list(sequences))
        return forward(sequences)

    backend.forward = recorded  # type: ignore[method-assign]
    options = {"max_tokens": MAX_TOKENS, "max_rows": MAX_ROWS, "capacity": 32, "timeout": 60.0, **limits}
    queue = BatchingQueue(backend, truncation, worker, metrics, **options)  # type: ignore[arg-type]
    try:
        yield Served(backend, truncation, metrics, worker, queue, passes)
    finally:
        worker.shutdown()


@contextmanager
def worker_held(worker: ModelWorker) -> Iterator[None]:
    """The worker is busy with another job until the block ends, so what is submitted meanwhile waits."""
    gate = threading.Event()
    worker.submit(gate.wait)
    try:
        yield
    finally:
        gate.set()


def alone(served: Served, query: str, texts: list[str]) -> torch.Tensor:
    """Scores as /answer computes them: inline, the request on its own."""
    query = served.truncation.fit_query(query)
    return rerank_inline(served.backend, query, texts, MAX_TOKENS, MAX_ROWS, served.metrics)


# ---- determinism ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("architecture", ["bi-encoder", "cross-encoder"])
def test_scores_are_the_same_bits_alone_and_batched_across_requests(
    tiny_bert_dir: Path, architecture: str, dtype: torch.dtype
) -> None:
    reranker = build_reranker(architecture, tiny_bert_dir).eval()
    with queue_for(reranker, dtype) as served:
        expected = [alone(served, q, t) for q, t in REQUESTS]
        passes_alone = len(served.passes)
        served.passes.clear()
        with worker_held(served.worker):  # all arrive before the first turn: they share passes
            futures = [served.queue.submit(q, t) for q, t in REQUESTS * 2]
        results = [f.result(timeout=120) for f in futures]
    assert len(served.passes) < 2 * passes_alone  # batched across requests, not request by request
    for (scores, _), reference in zip(results, expected * 2, strict=True):
        assert torch.equal(scores, reference)
    # And they are the reranker's own scores, within rounding (fp32) or bf16's precision.
    for (query, texts), (scores, _) in zip(REQUESTS, results, strict=False):
        with torch.no_grad():
            direct = reranker([served.truncation.fit_query(query)], [texts])[0]
        assert torch.allclose(scores, direct, atol=1e-5 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_documents_score_does_not_depend_on_its_place_in_the_request(
    tiny_bert_dir: Path, dtype: torch.dtype
) -> None:
    """Found on an Intel Xeon: a bi-encoder's scores as one matrix-vector product changed in the last bit
    when the same documents came in reverse order."""
    backend = RerankBackend(build_reranker("bi-encoder", tiny_bert_dir).eval(), dtype)
    query, texts = REQUESTS[0][0], [t for _, ts in REQUESTS for t in ts]
    for order in (texts[::-1], texts[1:] + texts[:1]):
        scored = backend.scores(backend.forward(backend.encode(query, order))).tolist()
        scores = dict(zip(order, scored, strict=True))
        reference = backend.scores(backend.forward(backend.encode(query, texts))).tolist()
        assert [scores[t] for t in texts] == reference


@pytest.mark.real_models
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_minilm_outputs_do_not_depend_on_pass_companions(dtype: torch.dtype) -> None:
    """With the default MiniLM, where plain batching changes bits (a 16-token sequence alone makes 16-row
    GEMMs, in a full pass 8192-row ones, and MKL and oneDNN round those differently), the packed backend
    does not: a sequence gets the same bits alone and at any offset among companions of any lengths."""
    reranker = build_reranker("bi-encoder", model_paths.resolve("reranker"))
    backend = RerankBackend(reranker, dtype)
    rng = random.Random(0)
    sequences = backend.encode("q", corpus_texts(200))
    assert len({len(s.ids) for s in sequences}) > 50  # many lengths, up to the 256-token limit
    reference = {i: backend.forward([sequences[i]])[0] for i in range(6)}
    for size in (2, 9, 40, len(sequences)):
        chosen = rng.sample(range(len(sequences)), size)
        chosen[rng.randrange(size)] = rng.randrange(6)
        out = backend.forward([sequences[i] for i in chosen])
        for row, i in enumerate(chosen):
            if i in reference:
                assert torch.equal(out[row], reference[i]), (size, row)


def test_the_fp32_gemm_library_is_measured_once_and_named_in_info(tiny_bert_dir: Path) -> None:
    library = rerank_backend.fp32_gemm_library()
    assert library in ("mkl", "onednn")
    assert rerank_backend.fp32_gemm_library() == library  # once per process: the bits do not change
    backend = RerankBackend(build_reranker("bi-encoder", tiny_bert_dir).eval(), torch.float32)
    assert backend.describe()["gemm_library"] == library


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equal_lengths_share_an_attention_call_with_the_bits_of_one_alone(
    tiny_bert_dir: Path, dtype: torch.dtype
) -> None:
    """Runs of equal-length sequences attend in one call; each sequence's output keeps the bits it has
    alone, in a run of any size and at any offset."""
    backend = RerankBackend(build_reranker("bi-encoder", tiny_bert_dir).eval(), dtype)
    sequences = [Encoded([101, *(1000 + 7 * i + j for j in range(30)), 102]) for i in range(40)]
    alone = [backend.forward([s])[0] for s in sequences]
    for companions in ([], [Encoded([101, 2000, 102])]):  # the run starts at row 0, or after a short text
        passed = [*companions, *sequences]
        runs = rerank_backend._runs(rerank_backend._spans([len(s.ids) for s in passed]))
        assert max(count for _, _, count in runs) > 20  # many sequences share one call
        out = backend.forward(passed)[len(companions) :]
        for row, reference in enumerate(alone):
            assert torch.equal(out[row], reference), row


@pytest.mark.parametrize("architecture", ["bert", "roberta"])
def test_the_packed_forward_reproduces_hugging_face(tokenizer_dir: Path, architecture: str) -> None:
    """The backend's own encoder forward against the Hugging Face model it was copied from (fp32)."""
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    config_class = BertConfig if architecture == "bert" else RobertaConfig
    config = config_class(vocab_size=30522, pad_token_id=0, num_labels=1, **sizes)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    reranker = CrossEncoderReranker(model, AutoTokenizer.from_pretrained(tokenizer_dir), "tiny", 128)
    backend = RerankBackend(reranker, torch.float32)
    query, texts = REQUESTS[0]
    with torch.no_grad():
        expected = reranker([query], [texts])[0]
    assert torch.allclose(backend.scores(backend.forward(backend.encode(query, texts))), expected, atol=1e-5)


@pytest.mark.parametrize("gemm", ["onednn", "mkl", "addmm"])
def test_the_packed_bi_encoder_forward_reproduces_hugging_face(
    tiny_bert_dir: Path, gemm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mean pooling over packed rows, across block boundaries (fp32): 31 texts fill more than one block; with
    oneDNN's or MKL's packed weights (whichever the CPU runs faster) and with the addmm path a GPU or a CPU
    without oneDNN takes."""
    monkeypatch.setattr(rerank_backend, "fp32_gemm_library", lambda: "mkl" if gemm == "mkl" else "onednn")
    if gemm == "addmm":
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    reranker = build_reranker("bi-encoder", tiny_bert_dir).eval()
    backend = RerankBackend(reranker, torch.float32)
    assert all((layer.up.packed is not None) == (gemm == "onednn") for layer in backend.layers)
    assert all((layer.up.mkl is not None) == (gemm == "mkl") for layer in backend.layers)
    assert backend.describe()["gemm_library"] == {"onednn": "onednn", "mkl": "mkl", "addmm": "torch"}[gemm]
    query, texts = REQUESTS[3]
    sequences = backend.encode(query, texts)
    assert sum(len(s.ids) for s in sequences) > TOKENS_PER_BLOCK
    with torch.no_grad():
        expected = reranker([query], [texts])[0]
    assert torch.allclose(backend.scores(backend.forward(sequences)), expected, atol=1e-5)


# ---- pass planning ----


def test_passes_respect_the_token_budget_and_the_row_limit() -> None:
    rng = random.Random(0)
    planner = PassPlanner(max_tokens=256, max_rows=5)
    jobs = []
    for _ in range(6):
        job = RerankJob()
        job.start([Encoded([0] * rng.randint(1, 300)) for _ in range(rng.randint(1, 30))])
        planner.add(job)
        jobs.append(job)
    seen = []
    while entries := planner.next_pass():
        tokens = sum(len(job.sequences[i].ids) for job, i in entries)
        assert len(entries) <= 5 and (tokens <= 256 or len(entries) == 1)  # a longer one goes alone
        seen += [(id(job), i) for job, i in entries]
    assert seen == [(id(job), i) for job in jobs for i in range(len(job.sequences))]  # each once, in order


def test_the_oldest_waiting_sequences_go_first_whatever_their_lengths() -> None:
    planner = PassPlanner(max_tokens=150, max_rows=100)
    first, second = RerankJob(), RerankJob()
    first.start([Encoded([0] * 100)])
    second.start([Encoded([0] * 10), Encoded([0] * 100)])
    planner.add(first)
    planner.add(second)
    assert planner.next_pass() == [(first, 0), (second, 0)]  # 110 tokens; the next would pass 150
    assert planner.next_pass() == [(second, 1)]
    assert not planner and planner.next_pass() == []


def test_passes_stay_within_the_budget_and_are_measured(tiny_bert_dir: Path) -> None:
    reranker = build_reranker("bi-encoder", tiny_bert_dir).eval()
    with queue_for(reranker, torch.float32) as served:
        with worker_held(served.worker):
            futures = [served.queue.submit(q, t) for q, t in REQUESTS]
        for future in futures:
            future.result(timeout=120)
    for sequences in served.passes:
        tokens = sum(len(s.ids) for s in sequences)
        assert len(sequences) <= MAX_ROWS and (tokens <= MAX_TOKENS or len(sequences) == 1)
    # Mixed lengths share passes: far fewer passes than distinct lengths.
    lengths = {len(s.ids) for sequences in served.passes for s in sequences}
    assert len(served.passes) < len(lengths) / 2
    text = served.metrics.render().decode()
    assert 'grerank_batch_tokens_bucket{le="512.0",stage="rerank"}' in text


@pytest.mark.parametrize("architecture", ["bi-encoder", "cross-encoder"])
def test_sequences_read_before_come_from_the_cache_with_the_same_bits(
    tiny_bert_dir: Path, architecture: str
) -> None:
    reranker = build_reranker(architecture, tiny_bert_dir).eval()
    with queue_for(reranker, torch.float32) as plain:
        expected = [alone(plain, q, t) for q, t in REQUESTS]
    metrics = Metrics()
    cache = RerankCache(2**20, metrics)
    with queue_for(reranker, torch.float32, cache=cache) as served:
        first = [served.queue.submit(q, t).result(timeout=120)[0] for q, t in REQUESTS]
        read = sum(len(p) for p in served.passes)
        served.passes.clear()
        again = [served.queue.submit(q, t).result(timeout=120)[0] for q, t in REQUESTS]
        inline = [
            rerank_inline(
                served.backend, served.truncation.fit_query(q), t, MAX_TOKENS, MAX_ROWS, metrics, cache=cache
            )
            for q, t in REQUESTS
        ]
        assert served.passes == []  # every sequence was read before: no forward pass at all
        # A request with one new text: only that text is read (and, for a cross-encoder, only that pair).
        query, texts = REQUESTS[0]
        mixed = served.queue.submit(query, [*texts[:3], "a text nobody sent before"]).result(timeout=120)[0]
        assert [len(p) for p in served.passes] == [1]
    for scores in (first, again, inline):
        for got, reference in zip(scores, expected, strict=True):
            assert torch.equal(got, reference)
    assert torch.equal(mixed[:3], expected[0][:3])
    assert len(cache) == read + 1 and 0 < cache.memory_bytes <= cache.budget_bytes
    text = metrics.render().decode()
    assert f'grerank_rerank_cache_lookups_total{{result="miss"}} {read + 1.0}' in text  # each read once


def test_the_cache_keeps_to_its_budget_dropping_the_least_recently_used() -> None:
    output = torch.zeros(8)
    cost = 8 * 4 + ENTRY_OVERHEAD_BYTES
    cache = RerankCache(2 * cost)
    a, b, c = (Encoded([101, i, 102]) for i in range(3))
    cache.put(a, output)
    cache.put(b, output + 1)
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, output + 2)
    assert cache.get(b) is None and torch.equal(cache.get(c), output + 2) and len(cache) == 2
    assert cache.memory_bytes == 2 * cost
    # Segment ids are part of a sequence: the same tokens in another segment are another sequence.
    assert cache.get(Encoded([101, 2, 102], [0, 1, 1])) is None
    off = RerankCache(0)
    off.put(a, output)
    assert off.get(a) is None and len(off) == 0


# ---- bounds, errors, time limits, fairness ----


def test_the_queue_is_bounded(tiny_bert_dir: Path) -> None:
    reranker = build_reranker("bi-encoder", tiny_bert_dir).eval()
    with queue_for(reranker, torch.float32, capacity=2) as served:
        with worker_held(served.worker):
            held = [served.queue.submit("q", ["a", "b"]) for _ in range(2)]
            with pytest.raises(QueueFull, match="GRERANK_MAX_QUEUE"):
                served.queue.submit("q", ["c"])
            assert served.worker.pending == 3  # the held job and two requests: the queue depth counts them
        for future in held:
            future.result(timeout=60)
        served.queue.submit("q", ["d"]).result(timeout=60)  # room again once they are answered
        assert served.worker.pending == 0


def test_a_request_the_tokenizer_rejects_fails_alone(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reranker = build_reranker("bi-encoder", tiny_bert_dir).eval()
    with queue_for(reranker, torch.float32) as served:
        encode = served.backend.encode

        def picky(query: str, texts: list[str]) -> list[Encoded]:
            if query == "unreadable":
                raise ValueError("cannot read this")
            return encode(query, texts)

        monkeypatch.setattr(served.backend, "encode", picky)
        with worker_held(served.worker):
            good = served.queue.submit(*REQUESTS[0])
            bad = served.queue.submit("unreadable", ["a"])
        with pytest.raises(RequestRejected, match="cannot read this"):
            bad.result(timeout=60)
        assert torch.equal(good.result(timeout=60)[0], alone(served, *REQUESTS[0]))


def test_a_failed_pass_fails_its_requests_and_the_queue_goes_on(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reranker = build_reranker("bi-encoder", tiny_bert_dir).eval()
    with queue_for(reranker, torch.float32) as served:
        forward = served.backend.forward
        failures = iter([RuntimeError("boom")])

        def failing_once(sequences: list[Encoded]) -> torch.Tensor:
            failure = next(failures, None)
            if failure is not None:
                raise failure
            return forward(sequences)

        monkeypatch.setattr(served.backend, "forward", failing_once)
        with pytest.raises(RuntimeError, match="boom"):
            served.queue.submit("q", ["a"]).result(timeout=60)
        scores, _ = served.queue.submit(*REQUESTS[1]).result(timeout=60)
        assert torch.equal(scores, alone(served, *REQUESTS[1]))


def test_a_request_over_its_time_limit_gets_a_stage_timeout(tiny_bert_dir: Path) -> None:
    reranker = build_reranker("bi-encoder", tiny_bert_dir).eval()
    with queue_for(reranker, torch.float32, timeout=1e-9, max_rows=1) as served:
        with pytest.raises(StageTimeout) as raised:
            served.queue.submit(*REQUESTS[0]).result(timeout=60)
        assert raised.value.stage == "rerank"
        assert len(served.passes) <= 1  # stopped at once, not after all of its passes


def test_other_model_work_gets_the_worker_between_passes(tiny_bert_dir: Path) -> None:
    reranker = build_reranker("bi-encoder", tiny_bert_dir).eval()
    with queue_for(reranker, torch.float32, max_rows=1) as served:
        with worker_held(served.worker):
            reranks = [served.queue.submit(q, t) for q, t in REQUESTS]
            answer = served.worker.submit(lambda: len(served.passes))  # e.g. an /answer, queued after them
        assert answer.result(timeout=60) == 1  # it ran after one pass, not after all of them
        for future in reranks:
            future.result(timeout=120)
        assert len(served.passes) == sum(len(t) + 1 for _, t in REQUESTS)


def test_http_status_of_queue_errors(tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    with serving(settings_for(tmp_path, tiny_bert_dir, tiny_llama_dir)) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        body = {"query": "q", "documents": ["a", "b"]}
        assert client.post("/rerank", json=body).status_code == 200
        queue = runtime.rerank_queue
        queue.capacity = 0
        full = client.post("/rerank", json=body)
        assert full.status_code == 429 and full.headers["retry-after"] and "GRERANK_MAX_QUEUE" in full.text
        queue.capacity = 32
        encode = queue.backend.encode
        queue.backend.encode = lambda query, texts: (_ for _ in ()).throw(ValueError("unreadable"))
        rejected = client.post("/rerank", json=body)
        assert rejected.status_code == 400 and "unreadable" in rejected.json()["detail"]
        queue.backend.encode = encode
        assert client.post("/rerank", json=body).status_code == 200
        assert client.get("/info").json()["rerank_batching"]["tokens_per_block"] == TOKENS_PER_BLOCK
