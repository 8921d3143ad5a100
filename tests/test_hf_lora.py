"""Adapters in the transformers engine itself (no Ray): mixed in one batch with the base,
loaded and unloaded between steps, and the adapters it cannot mix refused by name."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from llmray_serve.engine import SamplingParams, collect
from tests.lora_tools import make_adapter

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def engine(tiny_model):
    from llmray_serve.hf_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, max_batch=8, max_ongoing=16, adapters=True)
    yield engine
    engine.close()


async def test_a_batch_mixes_adapters_and_base_and_unloading_leaves_the_base(
    engine, tiny_model, tmp_path
) -> None:
    # peft wraps the separate projections: an engine with adapters keeps them (hf_fused.py).
    assert hasattr(engine.model.model.layers[0].self_attn, "q_proj")
    prompt = "Once upon a time"
    base = (await collect(engine.generate(prompt, GREEDY))).text
    one, _ = make_adapter(tiny_model, tmp_path / "one", seed=3)
    await engine.load_adapter("k1", str(one))
    alone = (await collect(engine.generate(prompt, replace(GREEDY, adapter="k1")))).text
    assert alone != base
    mixed = await asyncio.gather(
        *(
            collect(engine.generate(prompt, replace(GREEDY, adapter=key)))
            for key in ["k1", None, "k1", None, None, "k1"]
        )
    )
    assert [m.text for m in mixed] == [alone, base, alone, base, base, alone]
    await engine.unload_adapter("k1")
    assert (await collect(engine.generate(prompt, GREEDY))).text == base


async def test_an_adapter_carrying_whole_modules_is_refused_by_name(
    engine, tiny_model, tmp_path
) -> None:
    folder, _ = make_adapter(tiny_model, tmp_path / "embed", seed=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = ["embed_tokens"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"modules_to_save \['embed_tokens'\].*mergeLora: true"):
        await engine.load_adapter("k2", str(folder))
