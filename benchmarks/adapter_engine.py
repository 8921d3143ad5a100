"""The transformers engine alone (no Ray, no HTTP): 16 concurrent greedy requests of 16 tokens
on the base model, with and without 4 LoRA adapters loaded, spread over 4 adapters, and on
one adapter: what mixing adapters per token costs inside a step.

    python benchmarks/adapter_engine.py MODEL_DIR     # e.g. a folder from
                                                      # `llmray init-model DIR --from smollm2`
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def tokens_per_s(engine, keys: list[str | None], params) -> float:
    from llmray_serve.engine import collect

    start = time.perf_counter()
    outs = await asyncio.gather(
        *(
            collect(
                engine.generate(f"Tell me about {i}", replace(params, adapter=keys[i % len(keys)]))
            )
            for i in range(16)
        )
    )
    return sum(o.usage.completion_tokens for o in outs) / (time.perf_counter() - start)


async def main(base: Path) -> None:
    sys.path.insert(0, str(REPO))
    from llmray_serve.engine import SamplingParams
    from llmray_serve.hf_engine import TransformersEngine
    from tests.lora_tools import make_adapter

    work = Path(tempfile.mkdtemp())
    adapters = [make_adapter(base, work / f"a{i}", i, rank=8)[0] for i in range(4)]
    params = SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0)
    engine = TransformersEngine(base, max_batch=16, max_ongoing=32, adapters=True)
    print(f"base, no adapter loaded: {await tokens_per_s(engine, [None], params):.1f} tokens/s")
    for i, a in enumerate(adapters):
        await engine.load_adapter(f"k{i}", str(a))
    print(f"base, 4 adapters loaded: {await tokens_per_s(engine, [None], params):.1f} tokens/s")
    keys = ["k0", "k1", "k2", "k3"]
    print(f"spread over 4 adapters: {await tokens_per_s(engine, keys, params):.1f} tokens/s")
    print(f"one adapter: {await tokens_per_s(engine, ['k0'], params):.1f} tokens/s")
    engine.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
