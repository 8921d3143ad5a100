"""The LoRA adapters of one replica: which exist, which are ready, which are loaded (LRU).

Ray Serve hands the deployment's user_config (ServeUserConfig: the spec's adapters, resolved
by llmray.adapters) to `update()` whenever it changes, without restarting the replica. The
registry then answers, for a request's `model`:

    the served name         -> the base model
    a ready adapter         -> that adapter, loaded into the engine on first use
    an adapter not ready    -> AdapterNotReady (a 404 that says why: "FineTuneJob x is Running")
    anything else           -> UnknownModel (a 404)

At most `max_loaded` adapters are in the engine at once: loading one more first unloads the
least recently used adapter that no request is generating with (a request for a new adapter
waits while every loaded one is busy). An adapter is never unloaded under a request of its
own. Each load gets its own engine key ("a1", "a2", ...): an adapter whose uri changed loads
under a new key while requests on the old weights finish, and user names need not be valid
module names (peft keys modules by adapter name; "v1.2" would not be one).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from llmray.serve_args import AdapterArgs, ServeUserConfig
from llmray_serve.engine import AdapterEngine

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """No base and no adapter of this name."""


class AdapterNotReady(LookupError):
    """The adapter is in the spec but not served yet; the message says why."""


@dataclass
class _Loaded:
    name: str
    uri: str
    key: str  # the engine's name for this load
    in_flight: int = 0
    stale: bool = False  # removed from the spec or its uri changed: unload once idle


class AdapterRegistry:
    def __init__(
        self,
        engine: AdapterEngine,
        served_name: str,
        max_loaded: int,
        fetch: Callable[[str], str],
    ) -> None:
        """`fetch(uri)` -> a local folder (may download; called on a worker thread)."""
        self.engine, self.served_name, self.max_loaded = engine, served_name, max_loaded
        self._fetch = fetch
        self._table: dict[str, AdapterArgs] = {}
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # key -> load, LRU first
        self._current: dict[str, str] = {}  # adapter name -> key of its loaded current uri
        self._keys = (f"a{i}" for i in itertools.count(1))
        self._lock = asyncio.Lock()  # one load or eviction at a time
        self._released = asyncio.Event()  # a request finished: a busy adapter may be idle
        self.load_seconds: list[float] = []  # each load's time (benchmarks, logs)
        self._unloading: set[asyncio.Task] = set()  # referenced until done (asyncio's advice)

    # --- what Ray Serve's reconfigure calls ---

    def update(self, config: ServeUserConfig) -> None:
        """The new adapter list. Loads of adapters gone or moved become stale: unloaded now
        when idle, else when their last request ends."""
        self._table = {a.name: a for a in config.adapters}
        for load in list(self._loaded.values()):
            wanted = self._table.get(load.name)
            if wanted is None or not wanted.ready or wanted.uri != load.uri:
                self._retire(load)
        log.info(
            "adapters: %s",
            ", ".join(f"{a.name} ({'ready' if a.ready else a.reason})" for a in config.adapters)
            or "none",
        )

    # --- what the ingress calls ---

    def ready(self) -> list[str]:
        """The adapters /v1/models lists, in spec order."""
        return [a.name for a in self._table.values() if a.ready]

    def resolve(self, model: str) -> str | None:
        """None for the base model, the adapter's name for a ready adapter; raises
        UnknownModel / AdapterNotReady."""
        if model == self.served_name:
            return None
        adapter = self._table.get(model)
        if adapter is None:
            served = ", ".join(repr(m) for m in [self.served_name, *self.ready()])
            raise UnknownModel(f"model {model!r} does not exist; this server serves {served}")
        if not adapter.ready:
            raise AdapterNotReady(
                f"adapter {model!r} is not ready: {adapter.message} ({adapter.reason})"
            )
        return model

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[str]:
        """The engine key of adapter `name`, loaded and held (not evicted) until the block
        ends."""
        load = await self._acquire(name)
        try:
            yield load.key
        finally:
            load.in_flight -= 1
            self._released.set()
            if load.stale and load.in_flight == 0:
                self._retire(load)

    # --- internals ---

    async def _acquire(self, name: str) -> _Loaded:
        load = self._current_load(name)
        if load is None:
            async with self._lock:
                load = self._current_load(name) or await self._load(name)
        load.in_flight += 1
        self._loaded.move_to_end(load.key)
        return load

    def _current_load(self, name: str) -> _Loaded | None:
        key = self._current.get(name)
        return self._loaded.get(key) if key is not None else None

    async def _load(self, name: str) -> _Loaded:
        adapter = self._table.get(name)
        if adapter is None or not adapter.ready:  # changed while this request waited
            self.resolve(name)
            raise UnknownModel(f"adapter {name!r} is no longer served")
        while len(self._loaded) >= self.max_loaded:
            idle = next((x for x in self._loaded.values() if x.in_flight == 0), None)
            if idle is not None:
                await self._unload(idle)
                continue
            self._released.clear()  # every loaded adapter is generating: wait for one
            await self._released.wait()
        started = time.perf_counter()
        path = await asyncio.to_thread(self._fetch, adapter.uri)
        key = next(self._keys)
        await self.engine.load_adapter(key, path)
        seconds = time.perf_counter() - started
        self.load_seconds.append(seconds)
        log.info("adapter %s loaded from %s as %s in %.2f s", name, adapter.uri, key, seconds)
        load = _Loaded(name, adapter.uri, key)
        self._loaded[key] = load
        self._current[name] = key
        return load

    def _retire(self, load: _Loaded) -> None:
        load.stale = True
        if self._current.get(load.name) == load.key:
            del self._current[load.name]
        if load.in_flight == 0 and load.key in self._loaded:
            del self._loaded[load.key]  # counted free at once; the engine frees it next
            task = asyncio.get_running_loop().create_task(self._engine_unload(load))
            self._unloading.add(task)
            task.add_done_callback(self._unloading.discard)

    async def _unload(self, load: _Loaded) -> None:
        self._loaded.pop(load.key, None)
        if self._current.get(load.name) == load.key:
            del self._current[load.name]
        await self._engine_unload(load)

    async def _engine_unload(self, load: _Loaded) -> None:
        try:
            await self.engine.unload_adapter(load.key)
            log.info("adapter %s (%s) unloaded", load.name, load.key)
        except Exception:  # a failed free must not fail a request; the memory stays used
            log.exception("unloading adapter %s (%s) failed", load.name, load.key)
