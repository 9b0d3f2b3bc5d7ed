"""Which model versions are loaded, and swapping in new ones without failing a request.

The latest version of every model in the store is loaded at start-up; an older version is
loaded when a request names it (a few per model, least recently used dropped). A poller (and
`POST /admin/reload`) looks for newly published versions: a new version is loaded, verified and
warmed up on the side, then swapped in by replacing one reference. Requests already holding the
old version finish on it; its batchers drain and stop. A version that fails its checksum or its
load is refused, counted and logged, and the current one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from model_store import ModelStore, StoreError
from service import metrics
from service.batching import Batcher
from service.runtime import LoadedModel
from service.settings import Settings

log = logging.getLogger("icaserve.registry")


@dataclass
class Serving:
    """A loaded version with its two batchers."""

    model: LoadedModel
    predict: Batcher
    explain: Batcher
    last_used: float = field(default_factory=time.monotonic)


class ModelRegistry:
    def __init__(self, settings: Settings, device) -> None:
        self.settings = settings
        self.device = device
        self.store = ModelStore(settings.store)
        self._latest: dict[str, Serving] = {}
        self._older: dict[str, OrderedDict[int, Serving]] = {}
        self._refused: dict[tuple[str, int], str] = {}
        self._lock = asyncio.Lock()
        self.default_name: str | None = settings.default_model
        self.store_readable = True
        self._poller: asyncio.Task | None = None

    # -- loading ---------------------------------------------------------------------------
    def _serving(self, model: LoadedModel) -> Serving:
        s = self.settings

        def run_predict(seqs, _specs):
            return model.predict(seqs)

        def run_explain(seqs, specs):
            return model.explain(seqs, specs)

        return Serving(
            model,
            Batcher("predict", run_predict, max_batch=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000,
                    max_queue=s.predict_queue_size, enabled=s.batching),
            Batcher("explain", run_explain, max_batch=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000,
                    max_queue=s.explain_queue_size, enabled=s.batching),
        )

    async def _load(self, name: str, version: int) -> Serving | None:
        key = (name, version)
        if key in self._refused:
            return None
        try:
            model = await asyncio.to_thread(
                LoadedModel.load, self.store, name, version, self.device, self.settings.predict_backend
            )
        except Exception as exc:  # checksum, unreadable file, broken TorchScript, failed warm-up
            reason = type(exc).__name__
            self._refused[key] = f"{reason}: {exc}"
            metrics.MODEL_LOAD_FAILURES.labels(name, reason).inc()
            # the why in the message too: plain-text logs do not show the extra fields
            log.error("refused model version %s v%s: %s", name, version, self._refused[key],
                      extra={"model": name, "version": version, "reason": str(exc)})
            return None
        metrics.MODEL_LOADED.labels(name, str(version), model.backend, str(self.device)).set(1)
        metrics.LAST_RELOAD.set(time.time())
        log.info("loaded model version", extra={"model": name, "version": version, "device": str(self.device)})
        return self._serving(model)

    async def refresh(self) -> dict[str, int]:
        """Load any newer latest versions; returns what is serving as latest afterwards."""
        async with self._lock:
            try:
                if not await asyncio.to_thread(self.store.root.is_dir):  # removed, or replaced by a file
                    raise FileNotFoundError(f"{self.store.root} is not a readable folder")
                names = await asyncio.to_thread(self.store.models)
                self.store_readable = True
            except OSError as exc:
                if self.store_readable:  # once per outage, not on every poll
                    log.warning("model store unreadable (%s); serving what is loaded", exc,
                                extra={"reason": str(exc)})
                self.store_readable = False
                names = []
            for name in names:
                try:
                    latest = await asyncio.to_thread(self.store.resolve, name, "latest")
                except (StoreError, OSError):
                    continue
                current = self._latest.get(name)
                if current is not None and current.model.version >= latest:
                    continue
                serving = await self._load(name, latest)
                if serving is None:
                    continue
                self._latest[name] = serving
                if current is not None:
                    log.info("swapped model version", extra={"model": name, "from": current.model.version,
                                                              "to": latest})
                    self._retire(current)
            if self.default_name is None and self._latest:
                self.default_name = sorted(self._latest)[0]
            return {n: s.model.version for n, s in self._latest.items()}

    def _retire(self, serving: Serving) -> None:
        m = serving.model
        metrics.MODEL_LOADED.labels(m.name, str(m.version), m.backend, str(self.device)).set(0)

        async def stop() -> None:
            await serving.predict.drain_and_stop()
            await serving.explain.drain_and_stop()

        asyncio.get_running_loop().create_task(stop())

    async def get(self, name: str | None, version: int | str | None = None) -> Serving:
        """The serving version for a request; raises StoreError (-> 404) when there is none."""
        name = name or self.default_name
        if name is None:
            raise StoreError("no model is loaded")
        latest = self._latest.get(name)
        if version in (None, "latest"):
            if latest is None:
                raise_missing(self.store, name)
            return latest  # type: ignore[return-value]
        from model_store import check_version

        v = check_version(version)
        if latest is not None and latest.model.version == v:
            return latest
        older = self._older.setdefault(name, OrderedDict())
        if v in older:
            older.move_to_end(v)
            return older[v]
        async with self._lock:
            if v in older:
                return older[v]
            self.store.resolve(name, v)  # 404 for versions that do not exist
            serving = await self._load(name, v)
            if serving is None:
                from model_store import ManifestError

                raise ManifestError(f"{name} v{v} was refused: {self._refused.get((name, v))}")
            older[v] = serving
            while len(older) > self.settings.max_versions_loaded - 1:
                _, evicted = older.popitem(last=False)
                self._retire(evicted)
            return serving

    # -- views -----------------------------------------------------------------------------
    def latest(self) -> dict[str, Serving]:
        return dict(self._latest)

    def loaded(self) -> list[LoadedModel]:
        out = [s.model for s in self._latest.values()]
        for older in self._older.values():
            out.extend(s.model for s in older.values())
        return out

    def refused(self) -> dict[str, str]:
        return {f"{n}/{v}": why for (n, v), why in self._refused.items()}

    def ready(self) -> bool:
        return self.default_name is not None and self.default_name in self._latest

    def queue_depths(self) -> dict[str, int]:
        depths = {"predict": 0, "explain": 0}
        for s in self._latest.values():
            depths["predict"] += s.predict.depth()
            depths["explain"] += s.explain.depth()
        return depths

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        if self.settings.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # polling must never die
                log.exception("model poll failed")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        servings = list(self._latest.values()) + [s for o in self._older.values() for s in o.values()]
        for s in servings:
            await s.predict.drain_and_stop()
            await s.explain.drain_and_stop()


def raise_missing(store: ModelStore, name: str) -> None:
    store.resolve(name, "latest")  # raises ModelNotFound / InvalidName with a clear message
    from model_store import ManifestError

    raise ManifestError(f"model {name!r} exists but no version of it could be loaded")
