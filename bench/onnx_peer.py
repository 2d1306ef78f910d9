"""sentence-transformers on onnxruntime (``backend="onnx"``), fp32 and dynamically quantised int8: the ONNX
configurations a CPU user of the peer would try, run by the rerank benchmark in the peer's own venv.

Runs under the peer venv's Python (``make bench-infinity``: it has optimum-onnx and onnxruntime, which pin
an older transformers than the service's), so it imports nothing of this project. infinity-emb's own ONNX
engine (``--engine optimum``) would run the same onnxruntime session, but infinity-emb 0.0.78 does not load
with what installs beside torch 2.13: with optimum 2.x it passes an absolute file name that optimum refuses
and calls an optimisation API that no longer exists, and optimum 1.x's exporter fails to import under
torch 2.13.

Usage: ``python bench/onnx_peer.py SPEC.json`` where the spec names ``model`` (a sentence-transformers
folder), ``folder`` (scratch space), ``requests`` (lists of [query, *documents]), ``repeats`` and
``agreement`` (how many requests to return scores for). Prints one JSON object: per configuration, pairs/s
of all requests in one ``encode`` call and the scores; int8 uses onnxruntime's preset for the CPU's ISA.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def quantization_preset() -> str:
    """onnxruntime's dynamic-quantisation preset for the widest integer instructions this CPU has."""
    if platform.machine() in ("aarch64", "arm64"):
        return "arm64"
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def measure(model: Any, requests: list[list[str]], repeats: int, agreement: int) -> dict[str, Any]:
    from sentence_transformers import util

    texts = [text for request in requests for text in request]
    pairs = sum(len(request) - 1 for request in requests)
    model.encode(texts[:64])  # warm-up: onnxruntime plans its kernels on the first calls
    bulk = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode(texts, convert_to_tensor=True)
        bulk.append(pairs / (time.perf_counter() - start))
    scores = []
    for request in requests[:agreement]:
        embeddings = model.encode(request, convert_to_tensor=True)
        scores.append(util.cos_sim(embeddings[:1], embeddings[1:])[0].tolist())
    return {"bulk_pairs_per_s": statistics.median(bulk), "scores": scores}


def main(spec_path: str) -> None:
    import onnxruntime
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    spec = json.loads(Path(spec_path).read_text())
    model_dir = Path(spec["folder"]) / "model"
    # A copy: the export writes onnx/ files beside the weights, and the installed model stays untouched.
    shutil.copytree(spec["model"], model_dir, dirs_exist_ok=True)
    fp32 = SentenceTransformer(str(model_dir), device="cpu", backend="onnx")  # exported on load
    config = quantization_preset()
    export_dynamic_quantized_onnx_model(fp32, config, str(model_dir), file_suffix="int8")
    int8 = SentenceTransformer(
        str(model_dir), device="cpu", backend="onnx", model_kwargs={"file_name": "onnx/model_int8.onnx"}
    )
    args = spec["requests"], spec["repeats"], spec["agreement"]
    result = {
        "onnxruntime": onnxruntime.__version__,
        "fp32": measure(fp32, *args),
        "int8": {**measure(int8, *args), "quantization": f"dynamic, {config} preset"},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
