"""Fault injection in the API emulator (tests/kube/faults.py), as a client sees it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.kube.emulator import emulated_cluster
from tests.kube.faults import Faults
from tests.test_kube_emulator import CM_PATH, call, configmap

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture
async def kube(tmp_path):
    async with emulated_cluster(tmp_path) as (kube, _):
        yield kube


async def test_throttled_requests_get_429_with_retry_after(kube):
    kube.faults = Faults(throttle=1.0)
    async with kube.request("GET", CM_PATH) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["reason"] == "TooManyRequests"
    assert kube.faults.injected["throttle"] == 1


async def test_a_lost_answer_still_took_effect(kube):
    """An error *after* the request: the create happened although the client saw a 500."""
    kube.faults = Faults(error=1.0, seed=1)
    outcomes = []
    for i in range(20):
        status, _ = await call(kube, "POST", CM_PATH, configmap(f"cm-{i}"))
        outcomes.append(status)
    assert set(outcomes) == {500}
    stored = {cm["metadata"]["name"] for cm in kube.list_objects("v1/configmaps", "ns1")}
    after = kube.faults.injected["error-after"]
    assert 0 < after < 20 and len(stored) == after  # the others never happened
    assert sum(n for (res, _, _), n in kube.created.items() if res == "configmaps") == after


async def test_conflicts_hit_writes_only(kube):
    kube.faults = Faults(conflict=1.0)
    status, body = await call(kube, "POST", CM_PATH, configmap("a"))
    assert status == 409 and body["reason"] == "Conflict"
    assert kube.get_object("v1/configmaps", "ns1", "a") is None
    status, _ = await call(kube, "GET", CM_PATH)
    assert status == 200


async def test_the_same_seed_injects_the_same_faults():
    def run(seed: int) -> list:
        faults = Faults(seed=seed, throttle=0.1, error=0.1, conflict=0.1)
        return [faults.draw("patch") for _ in range(200)]

    assert run(3) == run(3) != run(4)


async def test_a_dropped_watch_is_cut_without_an_end(kube):
    """The connection goes mid-stream: the client sees a payload error, not a clean end."""
    await kube.apply_object(configmap("a"))
    kube.faults = Faults(watch_drop=0.5)
    events = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with kube.get(CM_PATH, params={"watch": "true"}) as resp:
            async for line in resp.content:
                events.append(json.loads(line))
    assert [e["type"] for e in events] == ["ADDED"]
    assert kube.faults.injected["watch-drop"] == 1
    kube.faults.enabled = False  # and a watch without faults stays open
    async with kube.get(CM_PATH, params={"watch": "true", "timeoutSeconds": "1"}) as resp:
        await asyncio.wait_for(resp.read(), 5)
