"""Prepacked oneDNN linears (hf_packed.py), fused q/k/v and gate/up projections (hf_fused.py)
and releasing a thread's OpenMP pool (omp_pools.py): the same predictions as the plain model,
each weight held once, the engine's greedy answer unchanged."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from llmray_serve.engine import SamplingParams, collect

pytestmark = pytest.mark.integration

TEXT = "Once upon a time there was a small model that learned to answer questions."


def linears(model):
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def assert_predicts_the_same(plain, other, ids) -> None:
    """Same logits (to summation order) and the same 16 greedy tokens."""
    import torch

    with torch.inference_mode():
        expected, got = plain(ids).logits, other(ids).logits
        assert torch.allclose(expected, got, atol=1e-4), (expected - got).abs().max()
        greedy = {"max_new_tokens": 16, "do_sample": False}
        assert torch.equal(plain.generate(ids, **greedy), other.generate(ids, **greedy))


def test_a_packed_model_predicts_what_the_plain_one_does_and_holds_each_weight_once(
    tiny_model,
) -> None:
    import torch

    from llmray_serve.hf_model import load_model
    from llmray_serve.hf_packed import PackedLinear
    from llmray_serve.prompts import load_tokenizer

    ids = torch.tensor([load_tokenizer(tiny_model)(TEXT)["input_ids"]])
    plain, _ = load_model(tiny_model, dtype="float32")
    packed, _ = load_model(tiny_model, dtype="float32", packed_batch=4)
    assert all(type(m) is PackedLinear for m in linears(packed))
    # The tiny model's weights are untied: each packed copy replaced its dense weight.
    assert all(m.weight.is_mkldnn for m in linears(packed))
    assert_predicts_the_same(plain, packed, ids)


def test_a_tied_weight_stays_dense_for_the_module_sharing_it() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmray_serve.hf_packed import pack_linears

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        expected = model(ids).logits
    assert pack_linears(model, 4) == len(linears(model))
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding and not embedding.is_mkldnn
    assert model.model.layers[0].mlp.up_proj.weight.is_mkldnn
    with torch.inference_mode():
        assert torch.allclose(expected, model(ids).logits, atol=1e-4)


def test_a_fused_model_predicts_what_the_plain_one_does_with_four_products_a_layer(
    tiny_model,
) -> None:
    import torch

    from llmray_serve.hf_model import load_model
    from llmray_serve.prompts import load_tokenizer

    ids = torch.tensor([load_tokenizer(tiny_model)(TEXT)["input_ids"]])
    plain, _ = load_model(tiny_model, dtype="float32")
    fused, _ = load_model(tiny_model, dtype="float32", packed_batch=4, fuse=True)
    layer = fused.model.layers[0]
    assert type(layer.self_attn).__name__ == "FusedLlamaAttention"
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
    assert len(linears(layer)) == 4  # qkv, o, gate_up, down
    config = plain.config
    head_dim = config.hidden_size // config.num_attention_heads
    q_k_v = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    assert layer.self_attn.qkv_proj.out_features == q_k_v
    assert layer.mlp.gate_up_proj.out_features == 2 * config.intermediate_size
    assert_predicts_the_same(plain, fused, ids)


def test_a_model_outside_the_llama_family_keeps_its_projections() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmray_serve.hf_fused import fuse_projections

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert fuse_projections(model) == 0


async def test_the_engine_answers_greedily_as_the_plain_model_does(tiny_model) -> None:
    import torch

    from llmray_serve.hf_engine import TransformersEngine
    from llmray_serve.hf_model import load_model

    engine = TransformersEngine(tiny_model, dtype="float32", max_batch=4, max_ongoing=4)
    try:
        assert type(engine.model.lm_head).__name__ == "PackedLinear"
        assert hasattr(engine.model.model.layers[0].self_attn, "qkv_proj")  # fused
        result = await collect(engine.generate(TEXT, SamplingParams(12, 0.0, 1.0)))
    finally:
        engine.close()
    plain, _ = load_model(tiny_model, dtype="float32")
    ids = engine.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = plain.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=engine.eos_ids)
    expected = engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.text == expected


def test_releasing_a_threads_openmp_pool_ends_its_worker_threads() -> None:
    # In a fresh process, so that no other test's OpenMP pools are around.
    script = textwrap.dedent(
        """
        import os, threading
        import torch
        from llmray import omp_pools

        torch.set_num_threads(2)
        def threads():
            return len(os.listdir("/proc/self/task"))
        before = threads()
        torch.randn(2000, 2000) @ torch.randn(2000, 2000)  # a parallel region: a pool
        with_pool = threads()
        assert omp_pools.release_thread_pool()
        after = threads()
        torch.randn(2000, 2000) @ torch.randn(2000, 2000)  # the next region makes a new one
        print(before, with_pool, after, threads())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, with_pool, after, again = map(int, out.stdout.split())
    assert with_pool > before and after < with_pool and again > after, out.stdout


def test_where_onednn_cannot_pack_the_model_stays_plain(tiny_model, monkeypatch) -> None:
    import torch

    from llmray_serve.hf_model import load_model

    def unsupported(*_):
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", unsupported)
    model, _ = load_model(tiny_model, dtype="float32", packed_batch=4)
    assert all(type(m) is torch.nn.Linear and not m.weight.is_mkldnn for m in linears(model))
