"""Many adapters, one deployment: `llmray serve`'s code path on a real local Ray Serve, real
HTTP, the official `openai` client.

Two adapters made with peft on the tiny model (random updates: greedy answers differ) answer
differently through one deployment, each as its merged model alone; interleaved at
concurrency 8; an adapter added (and a referenced job that succeeds) while a stream on
another runs: the stream completes, the new one is listed, the replica process is the same;
unknown / not-ready names are 404s; maxLoadedAdapters 1 evicts and reloads correctly.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from pathlib import Path

import openai
import pytest

from tests.lora_tools import make_adapter

pytestmark = pytest.mark.integration

PROMPT = "Tell me a story about the sea"
TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(path: Path, base: Path, adapters: dict[str, Path], max_loaded: int = 2) -> None:
    entries = [{"name": n, "uri": str(p)} for n, p in adapters.items()]
    entries.append({"name": "next-week", "fineTuneJobRef": {"name": "next-week"}})
    spec = {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "tiny-lora"},
        "spec": {
            "model": {"uri": str(base), "servedName": "tiny"},
            "adapters": entries,
            "maxLoadedAdapters": max_loaded,
            "generation": {"maxNewTokens": 32, "maxPromptTokens": 64},
        },
    }
    path.write_text(json.dumps(spec))  # YAML is a superset of JSON


def greedy_alone(model: Path) -> str:
    """The model's greedy answer in an engine of its own (no adapters, no Ray)."""
    import asyncio

    from llmray_serve.engine import SamplingParams, collect
    from llmray_serve.hf_engine import TransformersEngine

    engine = TransformersEngine(model, max_batch=2, max_ongoing=2)
    try:
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0, top_p=1.0)
        return asyncio.run(collect(engine.generate(PROMPT, params))).text
    finally:
        engine.close()


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    alpha, alpha_merged = make_adapter(tiny_model, out / "alpha", seed=1)
    beta, beta_merged = make_adapter(tiny_model, out / "beta", seed=2)
    expected = {
        "tiny": greedy_alone(tiny_model),
        "alpha": greedy_alone(alpha_merged),
        "beta": greedy_alone(beta_merged),
    }
    return {"base": tiny_model, "alpha": alpha, "beta": beta, "expected": expected, "dir": out}


@pytest.fixture(scope="module")
def served(ray_session, world):
    from ray import serve

    from llmray_serve import local

    spec = world["dir"] / "deployment.yaml"
    write_spec(spec, world["base"], {"alpha": world["alpha"], "beta": world["beta"]})
    running = local.local_deployment(spec)
    base_url = local.start(running.args, free_port(), user_config=running.user_config)
    state = {"spec": spec, "running": running, "url": base_url}
    yield state
    serve.shutdown()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["url"], api_key="unused", max_retries=0, timeout=120)


def answer(client: openai.OpenAI, model: str) -> str:
    done = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    return done.choices[0].text


def replica_pids() -> set[int]:
    import ray
    from ray.util.state import list_actors

    here = ray.get_runtime_context().gcs_address
    actors = list_actors(address=here, filters=[("state", "=", "ALIVE")])
    return {a.pid for a in actors if a.class_name.startswith("ServeReplica:tiny-lora:")}


def test_each_adapter_answers_as_its_merged_model_alone(client, world) -> None:
    expected = world["expected"]
    assert len(set(expected.values())) == 3  # the adapters really change the answers
    for model in ("alpha", "beta", "tiny", "alpha"):
        assert answer(client, model) == expected[model], model


def test_models_lists_the_ready_adapters_and_names_get_404s(client) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["tiny", "alpha", "beta"]
    assert models["alpha"].model_extra["parent"] == "tiny"
    with pytest.raises(openai.NotFoundError, match="model 'gamma' does not exist"):
        answer(client, "gamma")
    with pytest.raises(openai.NotFoundError, match=r"'next-week' is not ready: FineTuneJob"):
        answer(client, "next-week")


def test_interleaved_requests_for_both_adapters_and_the_base_at_concurrency_8(
    client, world
) -> None:
    models = ["alpha", "beta", "tiny", "beta"] * 6
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: answer(client, m), models))
    assert answers == [world["expected"][m] for m in models]


def test_adapters_added_while_a_stream_runs_apply_in_place(
    client, served, world, llmray_home
) -> None:
    from llmray_serve import local

    pids = replica_pids()
    assert len(pids) == 1
    stream = client.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True
    )
    chunks = iter(stream)
    text = next(chunks).choices[0].text  # the stream has started; the rest waits for us
    # An edit adds gamma (beta's weights) and the job next-week succeeds with an adapter.
    spec = served["spec"]
    write_spec(
        spec,
        world["base"],
        {"alpha": world["alpha"], "beta": world["beta"], "gamma": world["beta"]},
    )
    job = llmray_home / "jobs" / "next-week"
    job.mkdir(parents=True, exist_ok=True)
    (job / "status.json").write_text(
        json.dumps(
            {
                "phase": "Succeeded",
                "model": {
                    "uri": str(world["alpha"]),
                    "adapter": True,
                    "baseModel": str(world["base"]),
                },
            }
        )
    )
    served["running"] = local.reload(spec, served["running"])
    deadline = time.monotonic() + 30
    while [m.id for m in client.models.list().data] != [
        "tiny",
        "alpha",
        "beta",
        "gamma",
        "next-week",
    ]:
        assert time.monotonic() < deadline, "the new adapters were not listed within 30 s"
        time.sleep(0.2)
    text += "".join(c.choices[0].text for c in chunks)  # the stream completes, unchanged
    assert text == world["expected"]["alpha"]
    assert answer(client, "gamma") == world["expected"]["beta"]
    assert answer(client, "next-week") == world["expected"]["alpha"]
    assert replica_pids() == pids  # the same replica process: no restart


def test_one_loaded_adapter_evicts_and_reloads_correctly(client, served, world) -> None:
    """maxLoadedAdapters is a replica setting: changing it restarts the replica (as any
    change beyond the adapters), then each switch of adapter evicts the other one."""
    from llmray_serve import local

    spec = served["spec"]
    write_spec(spec, world["base"], {"alpha": world["alpha"], "beta": world["beta"]}, 1)
    served["running"] = local.reload(spec, served["running"])
    for model in ("alpha", "beta", "alpha", "tiny", "beta", "beta", "alpha"):
        assert answer(client, model) == world["expected"][model], model
    models = ["alpha", "beta"] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: answer(client, m), models))
    assert answers == [world["expected"][m] for m in models]
