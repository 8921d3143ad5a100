"""The replica's adapter registry with a fake engine: what is listed, what 404s say, LRU
loading and eviction, never unloading under a request, and live changes of the list."""

from __future__ import annotations

import asyncio

import pytest

from llmray.serve_args import AdapterArgs, ServeUserConfig
from llmray_serve.adapter_registry import AdapterNotReady, AdapterRegistry, UnknownModel


class FakeEngine:
    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}  # key -> path
        self.log: list[str] = []

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.sleep(0)
        self.loaded[name] = path
        self.log.append(f"load {name} {path}")

    async def unload_adapter(self, name: str) -> None:
        del self.loaded[name]
        self.log.append(f"unload {name}")


def config(*adapters: AdapterArgs) -> ServeUserConfig:
    return ServeUserConfig(adapters=list(adapters))


READY = [AdapterArgs(name=n, uri=f"/adapters/{n}") for n in ("legal", "support", "sales")]
WAITING = AdapterArgs(
    name="next-week",
    reason="FineTuneJobRunning",
    message="FineTuneJob next-week is Running: the adapter is served once it succeeded",
)


def registry(max_loaded: int = 2) -> tuple[AdapterRegistry, FakeEngine]:
    engine = FakeEngine()
    reg = AdapterRegistry(engine, "base", max_loaded, fetch=lambda uri: f"/cache{uri}")
    return reg, engine


async def test_lists_ready_adapters_and_says_why_others_are_not() -> None:
    reg, _ = registry()
    reg.update(config(READY[0], WAITING, READY[1]))
    assert reg.ready() == ["legal", "support"]
    assert reg.resolve("base") is None
    assert reg.resolve("legal") == "legal"
    with pytest.raises(AdapterNotReady, match=r"'next-week' is not ready: FineTuneJob next-week "):
        reg.resolve("next-week")
    with pytest.raises(UnknownModel, match=r"'nope' does not exist.*'base', 'legal', 'support'"):
        reg.resolve("nope")


async def test_loads_on_first_use_once_and_evicts_the_least_recently_used_idle_one() -> None:
    reg, engine = registry(max_loaded=2)
    reg.update(config(*READY))
    keys = {}
    for name in ("legal", "support", "legal"):  # legal is now the most recently used
        async with reg.use(name) as key:
            keys.setdefault(name, key)
            assert engine.loaded[key] == f"/cache/adapters/{name}"
    assert len(engine.log) == 2  # the second use of legal loaded nothing
    async with reg.use("sales") as sales:
        assert engine.loaded.keys() == {keys["legal"], sales}  # support (LRU) went
    assert engine.log[2] == f"unload {keys['support']}"
    async with reg.use("support") as again:  # and comes back when asked for
        assert engine.loaded[again] == "/cache/adapters/support"


async def test_an_adapter_in_use_is_never_evicted_a_new_one_waits_for_a_slot() -> None:
    reg, engine = registry(max_loaded=1)
    reg.update(config(*READY))
    held = reg.use("legal")
    legal = await held.__aenter__()
    waiting = asyncio.create_task(reg.use("support").__aenter__())
    await asyncio.sleep(0.05)
    assert not waiting.done() and list(engine.loaded) == [legal]  # legal still generating
    await held.__aexit__(None, None, None)  # its request ended
    support = await asyncio.wait_for(waiting, 5)
    assert list(engine.loaded) == [support] and engine.log[-2] == f"unload {legal}"


async def test_removed_or_moved_adapters_unload_once_their_requests_end() -> None:
    reg, engine = registry(max_loaded=4)
    reg.update(config(*READY))
    async with reg.use("support") as support:
        pass
    held = reg.use("legal")
    legal = await held.__aenter__()
    moved = AdapterArgs(name="legal", uri="/adapters/legal-v2")
    reg.update(config(moved))  # support removed, legal moved while a request of it runs
    await asyncio.sleep(0)
    assert support not in engine.loaded and legal in engine.loaded
    assert reg.ready() == ["legal"]
    with pytest.raises(UnknownModel):
        reg.resolve("support")
    async with reg.use("legal") as new:  # new requests get the new weights at once
        assert new != legal and engine.loaded[new] == "/cache/adapters/legal-v2"
    await held.__aexit__(None, None, None)
    await asyncio.sleep(0)
    assert legal not in engine.loaded


async def test_an_adapter_that_becomes_ready_is_served_without_a_restart() -> None:
    reg, engine = registry()
    reg.update(config(READY[0], WAITING))
    with pytest.raises(AdapterNotReady):
        reg.resolve("next-week")
    reg.update(config(READY[0], AdapterArgs(name="next-week", uri="/runs/next-week/model")))
    assert reg.resolve("next-week") == "next-week"
    async with reg.use("next-week") as key:
        assert engine.loaded[key] == "/cache/runs/next-week/model"


async def test_a_failed_load_fails_its_request_and_takes_no_slot() -> None:
    reg, engine = registry(max_loaded=1)
    reg.update(config(*READY))

    async def broken(name: str, path: str) -> None:
        raise ValueError(f"adapter {path}: modules_to_save ['embed_tokens']")

    engine.load_adapter = broken  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="modules_to_save"):
        async with reg.use("legal"):
            pass
    del engine.load_adapter  # the working one again
    async with reg.use("support") as key:
        assert engine.loaded == {key: "/cache/adapters/support"}
