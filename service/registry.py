"""Which model versions are loaded, and swapping in new ones without failing a request.

The latest version of every model in the store is loaded at start-up; an older version is
loaded when a request names it. Up to `max_versions_loaded` versions of a model stay loaded (the
latest always, then the most recently used others; the least recently used is dropped): a
version swapped out as latest stays loaded as an older one, and a version that a request loaded
before a poll found it becomes the latest without a second load. Every load is counted
(`icaserve_model_loads_total{model,reason}`).

A poller (and `POST /admin/reload`) looks for newly published versions: a new version is loaded,
verified and warmed up on the side, then swapped in by replacing one reference. All versions of a
model share its two batchers (service/batching.py), so requests already holding the old version
finish on it, in the same bounded queue. A version that fails its checksum, its manifest check or
its load is refused, counted and logged, and the current one keeps serving. A refused version is
tried again only when its files change (size, times, inode) or on `POST /admin/reload`, never on
every poll.

With several workers (`icaserve serve --workers N`), `POST /admin/reload` reaches one worker: it
bumps a reload generation in a file of a folder all workers share (`ICASERVE_CONTROL_DIR`, made
by `icaserve serve`), and every worker compares it (one stat) before routing each request and on
a short timer, and reloads when it moved.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from model_store import ManifestError, ModelStore, StoreError, check_version
from service import metrics
from service.batching import Batcher, Lane
from service.runtime import LoadedModel
from service.settings import Settings

log = logging.getLogger("icaserve.registry")

CONTROL_DIR_ENV = "ICASERVE_CONTROL_DIR"  # set by `icaserve serve` for several workers
GENERATION_FILE = "reload-generation"
WATCH_INTERVAL_S = 0.5  # how often an idle worker looks at the reload generation


@dataclass
class Serving:
    """A loaded version with its ways into the model's two batchers."""

    model: LoadedModel
    predict: Lane
    explain: Lane
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Refusal:
    """Why a version was refused, and what its files looked like just before that attempt."""

    reason: str
    signature: tuple | None
    retry: bool = False  # POST /admin/reload: the next attempt goes ahead whatever the files look like


class ReloadGeneration:
    """A counter in `<dir>/reload-generation`, shared by the workers of one server. Reading it
    costs one stat while it is unchanged; bumping it is atomic (file lock, write, rename)."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.dir = Path(directory) if directory else None
        self._key: tuple | None = None
        self._value = 0

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def current(self) -> int:
        if self.dir is None:
            return 0
        path = self.dir / GENERATION_FILE
        try:
            st = os.stat(path)
        except OSError:
            return 0
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._key:
            try:
                self._value = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                return self._value
            self._key = key
        return self._value

    def bump(self) -> int:
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".reload.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._key = None  # read it afresh under the lock
            value = self.current() + 1
            fd, tmp = tempfile.mkstemp(prefix=".generation-", dir=self.dir)
            with os.fdopen(fd, "w") as f:
                f.write(f"{value}\n")
            os.replace(tmp, self.dir / GENERATION_FILE)  # a new inode: readers see the change
        return value


class ModelRegistry:
    def __init__(self, settings: Settings, device) -> None:
        self.settings = settings
        self.device = device
        self.store = ModelStore(settings.store)
        self._latest: dict[str, Serving] = {}
        self._older: dict[str, OrderedDict[int, Serving]] = {}  # least recently used first
        self._batchers: dict[str, tuple[Batcher, Batcher]] = {}  # per model, shared by its versions
        self._refused: dict[tuple[str, int], Refusal] = {}
        self._lock = asyncio.Lock()
        self.default_name: str | None = settings.default_model
        self.store_readable = True
        self._started = False
        self._poller: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._generation = ReloadGeneration(os.environ.get(CONTROL_DIR_ENV))
        self._seen_generation = 0
        self._follow_lock = asyncio.Lock()

    # -- loading ---------------------------------------------------------------------------
    def _model_batchers(self, name: str) -> tuple[Batcher, Batcher]:
        if name not in self._batchers:
            s = self.settings
            self._batchers[name] = (
                Batcher("predict", max_batch=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000,
                        max_queue=s.predict_queue_size, enabled=s.batching),
                Batcher("explain", max_batch=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000,
                        max_queue=s.explain_queue_size, enabled=s.batching),
            )
        return self._batchers[name]

    def _serving(self, model: LoadedModel) -> Serving:
        predict, explain = self._model_batchers(model.name)

        def run_predict(seqs, _specs):
            return model.predict(seqs)

        def run_explain(seqs, specs):
            return model.explain(seqs, specs)

        return Serving(model, predict.lane(run_predict), explain.lane(run_explain))

    async def _load(self, name: str, version: int, reason: str) -> Serving | None:
        """Load one version; None when it is (or stays) refused."""
        key = (name, version)
        try:  # before the attempt: files that change during or after it make the next one go ahead
            signature = await asyncio.to_thread(self.store.signature, name, version)
        except (StoreError, OSError):
            signature = None
        refusal = self._refused.get(key)
        if refusal is not None and not refusal.retry and (signature is None or signature == refusal.signature):
            return None
        if refusal is not None:
            log.info("retrying refused model version %s v%s (%s)", name, version,
                     "reload requested" if refusal.retry else "its files changed",
                     extra={"model": name, "version": version})
        try:
            model = await asyncio.to_thread(
                LoadedModel.load, self.store, name, version, self.device, self.settings.predict_backend
            )
            if model.version != version or model.name != name:  # the store checks this; never serve a mislabel
                raise ManifestError(f"loaded {model.name} v{model.version} from {name} v{version}")
        except Exception as exc:  # checksum, manifest, unreadable file, broken TorchScript, failed warm-up
            kind = type(exc).__name__
            self._refused[key] = Refusal(f"{kind}: {exc}", signature)
            metrics.MODEL_LOAD_FAILURES.labels(name, kind).inc()
            # the why in the message too: plain-text logs do not show the extra fields
            log.error("refused model version %s v%s: %s", name, version, self._refused[key].reason,
                      extra={"model": name, "version": version, "reason": str(exc)})
            return None
        self._refused.pop(key, None)
        metrics.MODEL_LOADS.labels(name, reason).inc()
        metrics.MODEL_LOADED.labels(name, str(version), model.backend, str(self.device)).set(1)
        metrics.LAST_RELOAD.set(time.time())
        log.info("loaded model version", extra={"model": name, "version": version, "device": str(self.device),
                                                "reason": reason})
        return self._serving(model)

    async def refresh(self, force: bool = False) -> dict[str, int]:
        """Load any newer latest versions; returns what is serving as latest afterwards.
        `force` (admin reload): refused versions are tried again even if their files look the same."""
        async with self._lock:
            metrics.STORE_SCANS.inc()
            if force:
                for refusal in self._refused.values():
                    refusal.retry = True
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
                older = self._older.get(name)
                serving = older.pop(latest, None) if older else None  # a request loaded it already
                if serving is None:
                    serving = await self._load(name, latest, "new_version" if self._started else "startup")
                if serving is None:
                    continue
                self._latest[name] = serving
                if current is not None:
                    log.info("swapped model version", extra={"model": name, "from": current.model.version,
                                                              "to": latest})
                    self._keep_older(name, current)  # requests may still name it: keep it warm
            if self.default_name is None and self._latest:
                self.default_name = sorted(self._latest)[0]
            return {n: s.model.version for n, s in self._latest.items()}

    async def reload(self) -> dict[str, int]:
        """`POST /admin/reload`: this worker reloads now (refused versions included), and every
        other worker of this server when it next routes a request or looks (WATCH_INTERVAL_S)."""
        generation = 0
        if self._generation.enabled:
            try:
                generation = await asyncio.to_thread(self._generation.bump)
            except OSError as exc:  # the others will not follow; this worker still reloads
                log.warning("could not signal the reload to the other workers (%s)", exc,
                            extra={"reason": str(exc)})
        serving = await self.refresh(force=True)
        self._seen_generation = max(self._seen_generation, generation)
        return serving

    async def follow_reloads(self) -> None:
        """Reload if another worker was asked to since we last looked: one stat when nothing moved."""
        if not self._generation.enabled:
            return
        generation = self._generation.current()
        if generation <= self._seen_generation:
            return
        async with self._follow_lock:  # requests arriving meanwhile wait for the reload, then route
            if generation <= self._seen_generation:
                return
            log.info("reload requested through another worker", extra={"generation": generation})
            await self.refresh(force=True)
            self._seen_generation = max(self._seen_generation, generation)

    def _keep_older(self, name: str, serving: Serving) -> None:
        """Put a version in the model's recently used set, dropping the least recently used beyond
        `max_versions_loaded` (the latest counts as one of them)."""
        older = self._older.setdefault(name, OrderedDict())
        older[serving.model.version] = serving
        older.move_to_end(serving.model.version)
        while len(older) > max(self.settings.max_versions_loaded - 1, 0):
            _, evicted = older.popitem(last=False)
            self._retire(evicted)

    def _retire(self, serving: Serving) -> None:
        """No longer loaded: requests holding it finish on it (the batchers are the model's)."""
        m = serving.model
        metrics.MODEL_LOADED.labels(m.name, str(m.version), m.backend, str(self.device)).set(0)
        log.info("unloaded model version", extra={"model": m.name, "version": m.version})

    async def get(self, name: str | None, version: int | str | None = None) -> Serving:
        """The serving version for a request; raises StoreError (-> 404) when there is none."""
        await self.follow_reloads()
        name = name or self.default_name
        if name is None:
            raise StoreError("no model is loaded")
        latest = self._latest.get(name)
        if version in (None, "latest"):
            if latest is None:
                raise_missing(self.store, name)
            return latest  # type: ignore[return-value]
        v = check_version(version)
        if latest is not None and latest.model.version == v:
            return latest
        older = self._older.get(name)
        if older is not None and v in older:
            older.move_to_end(v)
            return older[v]
        async with self._lock:
            latest = self._latest.get(name)  # a refresh may have run while we waited
            if latest is not None and latest.model.version == v:
                return latest
            older = self._older.get(name)
            if older is not None and v in older:
                older.move_to_end(v)
                return older[v]
            self.store.resolve(name, v)  # 404 for versions that do not exist
            serving = await self._load(name, v, "pinned")
            if serving is None:
                refusal = self._refused.get((name, v))
                raise ManifestError(f"{name} v{v} was refused: {refusal.reason if refusal else 'unknown'}")
            self._keep_older(name, serving)
            return serving

    # -- views -----------------------------------------------------------------------------
    def latest(self) -> dict[str, Serving]:
        return dict(self._latest)

    def loaded(self) -> list[LoadedModel]:
        out = [s.model for s in self._latest.values()]
        for older in self._older.values():
            out.extend(s.model for s in older.values())
        return out

    def refused(self, name: str | None = None) -> dict[str, str]:
        return {f"{n}/{v}": r.reason for (n, v), r in self._refused.items() if name is None or n == name}

    def ready(self) -> bool:
        return self.default_name is not None and self.default_name in self._latest

    def queue_depths(self) -> dict[str, int]:
        depths = {"predict": 0, "explain": 0}
        for predict, explain in self._batchers.values():
            depths["predict"] += predict.depth()
            depths["explain"] += explain.depth()
        return depths

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._seen_generation = self._generation.current()  # what we load now is that generation's
        await self.refresh()
        self._started = True
        loop = asyncio.get_running_loop()
        if self.settings.poll_interval_s > 0:
            self._poller = loop.create_task(self._poll())
        if self._generation.enabled:
            self._watcher = loop.create_task(self._watch())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # polling must never die
                log.exception("model poll failed")

    async def _watch(self) -> None:
        """An idle worker follows reloads too (its /readyz and metrics stay current)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                await self.follow_reloads()
            except Exception:
                log.exception("following a reload failed")

    async def stop(self) -> None:
        for task in (self._poller, self._watcher):
            if task is not None:
                task.cancel()
        for predict, explain in self._batchers.values():
            await predict.drain_and_stop()
            await explain.drain_and_stop()


def raise_missing(store: ModelStore, name: str) -> None:
    store.resolve(name, "latest")  # raises ModelNotFound / InvalidName with a clear message
    raise ManifestError(f"model {name!r} exists but no version of it could be loaded")
