"""Precision choices shared by training and the service (grerank/runtime.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from grerank import runtime


@pytest.fixture
def cpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An AVX2-only CPU (AMD Zen 3): no AVX-512 BF16, no AMX."""
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    runtime.cpu_bf16_speedup.cache_clear()
    yield
    runtime.cpu_bf16_speedup.cache_clear()


def test_auto_serves_fp32_where_bf16_would_be_emulated(cpu_without_bf16: None) -> None:
    assert runtime.cpu_bf16_speedup() == 0.0
    assert runtime.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_bf16_asked_for_on_such_a_cpu_is_honoured_with_a_warning(
    cpu_without_bf16: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="grerank.runtime"):
        assert runtime.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert "without bf16 instructions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grerank.runtime"):
        assert runtime.resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert caplog.text == ""


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision"):
        runtime.resolve_dtype("int4", torch.device("cpu"))
