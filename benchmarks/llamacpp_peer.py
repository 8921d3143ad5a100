"""llama.cpp's `llama-server` as a benchmark peer (never a dependency of llmray).

Where it comes from (a 2-core build takes several minutes):

    pip download llama-cpp-python --no-binary :all: --no-deps     # the sdist vendors llama.cpp
    tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build build -j2 --target llama-server
    pip install ./gguf-py sentencepiece      # for the converter
    python convert_hf_to_gguf.py --outtype f32 --outfile smollm2-f32.gguf <HF model folder>

On a VM that advertises AMX without kernel support a native build crashes in ggml's AMX
kernels: add `-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"` (and CXX) there.
The binary is found as $LLAMA_SERVER or `llama-server` on PATH; the GGUF is --gguf.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx


def binary() -> str | None:
    return os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


def start(gguf: Path, port: int, parallel: int, threads: int) -> subprocess.Popen:
    """`llama-server` on loopback with `parallel` slots (its continuous batching), each with
    room for a benchmark request (prompt + 32-256 new tokens); returns once /health is OK."""
    exe = binary()
    if exe is None:
        raise FileNotFoundError("llama-server: set LLAMA_SERVER or put it on PATH")
    proc = subprocess.Popen(
        [
            exe,
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--parallel",
            str(parallel),
            "--ctx-size",
            str(512 * parallel),  # split evenly between the slots
            "--threads",
            str(threads),
            "--jinja",  # the GGUF's own chat template, as transformers renders it
            "--no-webui",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("llama-server did not become healthy")
