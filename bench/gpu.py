"""A short GPU benchmark, run by ``bench/gpu_check.sh`` on a CUDA machine: ``python -m bench.gpu --out F``.

* rerank: pairs/s of the service's backend (packed passes, bf16, variable-length attention) against
  sentence-transformers with fp16 and bf16 weights on the same GPU and the same inputs (requests of one query
  and 20 passages of 128 tokens, all requests in one ``encode`` call: its best throughput);
* reader: time to first token over 3 documents with their states cached, against Hugging Face ``generate``
  on the concatenated prompt.

The models are the default models' architectures (MiniLM-L6, SmolLM2-135M) with random weights, built from
their configs: the weights do not travel to a GPU machine (its working tree is limited to 64 MiB) and speed
depends on shapes alone. Texts are random words of a synthetic word-level vocabulary, so every passage is
exactly 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from bench.environment import machine, versions
from grerank.decoder_reader import DecoderReader
from grerank.passage import Passage
from grerank.reranker import BiEncoderReranker
from grerank.sentence_encoder import SentenceEncoder
from service.engine.rerank_backend import RerankBackend

DOCUMENTS, DOC_TOKENS, REQUESTS = 20, 128, 64
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
SMOLLM2 = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)


def save_word_level_models(
    root: Path, words: Sequence[str], models: dict[str, Callable[[int], torch.nn.Module]]
) -> dict[str, Path]:
    """A BERT word-level tokenizer over ``words`` (and BERT's special tokens) and, for each name, the model
    ``models[name](vocab_size)`` beside it, saved as Hugging Face folders under ``root``; their paths."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    for name, build in models.items():
        build(len(vocab)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {name: root / name for name in models}


def build(root: Path) -> dict[str, Path]:
    """A 30,000-word vocabulary and the two random models over it, saved as Hugging Face folders."""
    models = {
        "reranker": lambda vocab: BertModel(BertConfig(vocab_size=vocab, **MINILM)),
        "reader": lambda vocab: LlamaForCausalLM(
            LlamaConfig(vocab_size=vocab, pad_token_id=0, eos_token_id=3, **SMOLLM2)
        ),
    }
    return save_word_level_models(root, [f"w{i}" for i in range(30000)], models)


def words(n: int, rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(30000)}" for _ in range(n))


def timed(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call, synchronising the GPU around each."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rerank(folder: Path, rng: random.Random) -> dict[str, float]:
    queries = [words(16, rng) for _ in range(REQUESTS)]
    documents = [[words(DOC_TOKENS - 2, rng) for _ in range(DOCUMENTS)] for _ in range(REQUESTS)]
    pairs = REQUESTS * DOCUMENTS
    reranker = BiEncoderReranker(SentenceEncoder.from_pretrained(folder), str(folder)).to("cuda").eval()
    backend = RerankBackend(reranker, torch.bfloat16)
    sequences = [s for q, docs in zip(queries, documents, strict=True) for s in backend.encode(q, docs)]
    passes = [sequences[i : i + 8 * (DOCUMENTS + 1)] for i in range(0, len(sequences), 8 * (DOCUMENTS + 1))]
    out = {"grerank_backend_bf16": pairs / timed(lambda: [backend.forward(p) for p in passes])}

    from sentence_transformers import SentenceTransformer, models

    texts = [t for q, docs in zip(queries, documents, strict=True) for t in (q, *docs)]
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        transformer = models.Transformer(str(folder), model_args={"torch_dtype": dtype})
        model = SentenceTransformer(
            modules=[transformer, models.Pooling(384, "mean"), models.Normalize()], device="cuda"
        )
        with torch.inference_mode():
            seconds = timed(lambda m=model: m.encode(texts, batch_size=256, convert_to_tensor=True))
        out[f"sentence_transformers_{name}"] = pairs / seconds
    strongest = max(v for k, v in out.items() if k.startswith("sentence"))
    out["backend_vs_strongest_sentence_transformers"] = out["grerank_backend_bf16"] / strongest
    return out


def reader_ttft(folder: Path, rng: random.Random) -> dict[str, float]:
    reader = DecoderReader.from_pretrained(folder, device="cuda", dtype=torch.bfloat16)
    passages = [Passage(f"t{i}", words(150, rng)) for i in range(3)]
    question = words(20, rng)
    states = reader.encode_documents(passages)

    def cached() -> None:
        next(iter(reader.stream_answer(question, states, 1)), None)

    prompt = (
        reader.prefix_ids
        + [t for p in passages for t in reader.document_ids(p)]
        + reader._question_ids(question)
    )
    ids = torch.tensor([prompt], device="cuda")

    def concatenated() -> None:
        reader.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)

    with torch.inference_mode():
        out = {"cached_states_ms": 1000 * timed(cached, 10), "hf_generate_ms": 1000 * timed(concatenated, 10)}
    out["speedup"] = out["hf_generate_ms"] / out["cached_states_ms"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write the results to")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark runs on a GPU machine (bench/gpu_check.sh)")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="grerank-gpu-") as tmp:
        folders = build(Path(tmp))
        result = {
            "machine": machine(),
            "versions": versions(),
            "command": f"python -m bench.gpu --out {args.out}",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rerank_pairs_per_s": rerank(folders["reranker"], rng),
            "reader_time_to_first_token": reader_ttft(folders["reader"], rng),
        }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
