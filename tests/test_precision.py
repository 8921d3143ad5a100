"""Serving precision: spec.dtype resolved on the replica's hardware, and what the server says
about it (serve args, the RayService it renders, /v1/models)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from llmray.api.validation import parse_llmdeployment
from llmray.precision import cpu_bf16_flags, read_cpu_flags, resolve_dtype
from llmray.serve_args import resolve_serve_args

AVX2_EPYC = {"fpu", "sse4_2", "avx", "avx2", "fma"}  # Milan: no AVX-512, no AMX
ZEN4 = AVX2_EPYC | {"avx512f", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "amx_tile", "amx_int8", "amx_bf16"}


def cpu(requested: str, flags: set[str], quantization: str = "none") -> str:
    bf16 = cpu_bf16_flags(flags)
    return resolve_dtype(
        requested,
        device_type="cpu",
        native_bf16=bool(bf16),
        bf16_flags=bf16,
        quantization=quantization,
    ).dtype


@pytest.mark.parametrize(
    ("requested", "flags", "quantization", "expected"),
    [
        ("auto", AVX2_EPYC, "none", "float32"),
        ("auto", ZEN4, "none", "bfloat16"),
        ("auto", SAPPHIRE_RAPIDS, "none", "bfloat16"),
        ("auto", set(), "none", "float32"),  # no flags read (not Linux): never assume bf16
        ("float32", SAPPHIRE_RAPIDS, "none", "float32"),  # the user's choice wins
        ("bfloat16", AVX2_EPYC, "none", "bfloat16"),
        ("float16", AVX2_EPYC, "none", "float16"),
        ("auto", SAPPHIRE_RAPIDS, "int8", "float32"),  # int8 keeps fp32 activations
    ],
)
def test_cpu_dtype_follows_the_cpu_flags(requested, flags, quantization, expected) -> None:
    assert cpu(requested, flags, quantization) == expected


def test_the_reason_names_the_flag_and_the_choice() -> None:
    flags = cpu_bf16_flags(SAPPHIRE_RAPIDS)
    assert flags == ("amx_bf16",)
    auto = resolve_dtype("auto", device_type="cpu", native_bf16=True, bf16_flags=flags)
    assert auto.reason == "auto: the CPU has native bf16 (amx_bf16)"
    slow = resolve_dtype("auto", device_type="cpu", native_bf16=False)
    assert "no native bf16" in slow.reason
    asked = resolve_dtype("float32", device_type="cpu", native_bf16=True)
    assert asked.reason == "spec.dtype float32"


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_gpu_auto_is_bf16_where_supported(native: bool, expected: str) -> None:
    assert resolve_dtype("auto", device_type="cuda", native_bf16=native).dtype == expected


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n"
    )
    assert read_cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_bf16_needs_the_flag_and_torch_to_agree(monkeypatch) -> None:
    """A VM may list a flag the OS did not enable (torch's check sees that): no bf16 then."""
    import torch

    from llmray_serve import hf_model

    monkeypatch.setattr(hf_model.precisions, "read_cpu_flags", lambda: frozenset(ZEN4))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert hf_model.native_bf16("cpu") == (True, ("avx512_bf16",))
    assert hf_model.resolve("cpu", "auto", "none").dtype == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert hf_model.native_bf16("cpu")[0] is False
    assert hf_model.resolve("cpu", "auto", "none").dtype == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(hf_model.precisions, "read_cpu_flags", lambda: frozenset(AVX2_EPYC))
    assert hf_model.resolve("cpu", "auto", "none").dtype == "float32"


def deployment(**spec) -> dict:
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": {"model": {"uri": "s3://bucket/models/demo"}, **spec},
    }


def test_serve_args_carry_the_dtype() -> None:
    dep = parse_llmdeployment(deployment(dtype="float32"))
    assert resolve_serve_args(dep, model_uri="s3://bucket/models/demo").dtype == "float32"
    default = resolve_serve_args(parse_llmdeployment(deployment()), model_uri="x")
    assert default.dtype == "auto"


def test_the_rayservice_passes_them_to_the_replicas() -> None:
    import yaml

    from llmray_operator import rayservice

    dep = parse_llmdeployment(deployment(dtype="bfloat16"))
    config = rayservice.serve_config(rayservice.serve_args(dep, "s3://bucket/models/demo"))
    args = yaml.safe_load(config)["applications"][0]["args"]
    assert args["dtype"] == "bfloat16"


async def test_models_shows_the_precision() -> None:
    from llmray_serve.ingress import IngressSettings, build_api

    settings = IngressSettings(
        served_name="tiny", model_details={"dtype": "bfloat16", "quantization": "none"}
    )
    app = build_api(object(), settings)  # type: ignore[arg-type]  # /v1/models asks no engine
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://llmray")
    client = openai.AsyncOpenAI(base_url="http://llmray/v1", api_key="x", http_client=http)
    listed = (await client.models.list()).data[0]
    assert (listed.id, listed.dtype, listed.quantization) == ("tiny", "bfloat16", "none")
    one = await client.models.retrieve("tiny")
    assert one.dtype == "bfloat16"
