"""Run the service under a real uvicorn on a free loopback port, in a subprocess, for the service tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``uvicorn service.app:create_app --factory`` with ``GRERANK_*`` settings from ``env``."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Only the settings given here: a GRERANK_* variable of the calling shell must not leak in.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("GRERANK_")}
        self.env = {
            **inherited,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "GRERANK_MODEL_CACHE": os.environ.get("GRERANK_MODEL_CACHE", str(ROOT / ".model_cache")),
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        command = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_until(self, path: str, status: int, timeout: float = 120.0) -> httpx.Response:
        """Poll ``path`` until it answers ``status`` (bounded); fails with the server log otherwise."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.url + path, timeout=5)
                if response.status_code == status:
                    return response
                last = response.text
            except httpx.TransportError as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(
            f"{path} did not answer {status} within {timeout}s (last: {last}):\n{self.log()}"
        )

    def wait_failed(self, timeout: float = 120.0) -> httpx.Response:
        """Wait until the models have failed to load: the ``/readyz`` answer that says so (bounded)."""
        self.wait_until("/healthz", 200, timeout)
        deadline = time.monotonic() + timeout
        while "failed" not in (readyz := httpx.get(self.url + "/readyz", timeout=5)).text:
            assert time.monotonic() < deadline, f"{readyz.text}\n{self.log()}"
            time.sleep(0.2)
        return readyz

    def wait_ready(self, timeout: float = 120.0) -> Server:
        self.wait_until("/readyz", 200, timeout)
        return self

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (graceful) or SIGKILL (a crash); waits a bounded time either way."""
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def tiny_env(tiny_bert_dir: Path, tiny_llama_dir: Path, index_dir: Path) -> dict[str, str]:
    """Environment for a service on the tiny test models (see conftest), CPU, fp32, short answers."""
    return {
        "GRERANK_EMBEDDER": str(tiny_bert_dir),
        "GRERANK_RERANKER": str(tiny_bert_dir),
        "GRERANK_READER": str(tiny_llama_dir),
        "GRERANK_INDEX_DIR": str(index_dir),
        "GRERANK_DEVICE": "cpu",
        "GRERANK_PRECISION": "fp32",
        "GRERANK_READER_MAX_NEW_TOKENS": "4",
    }
