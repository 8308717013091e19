"""``create_app(settings)``: the FastAPI application. The lifespan starts a background thread that loads the
model, the stored adapters and the engine, so that /healthz answers at once and /readyz says 503 until all is
ready. Nothing heavy happens at import time."""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from adapters_store import AdapterStore

from .api import router
from .config import Settings
from .errors import install_error_handlers
from .limits import BodyLimit
from .metrics import Metrics
from .threads import run_isolated

log = logging.getLogger(__name__)


class ServerState:
    """Everything the routes reach through ``app.state.server``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.started_at = time.time()
        self.base = self.store = self.registry = self.engine = self.jobs = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self._closing = threading.Event()
        self.streams = 0  # open streaming responses (event loop thread only)

    def run(self) -> None:
        """The model thread: load everything, then run the engine loop here until shutdown. All of the
        server's torch work stays on this one thread (see ``Engine.run``)."""
        from .engine import Engine
        from .jobs import JobFiles, JobManager
        from .model import load_base
        from .registry import Registry
        from .runner import ModelRunner, projection_layout
        from .sparse_kernel import applies_to
        from .sparse_kernel import load as load_kernel

        s = self.settings
        try:
            if s.threads:
                torch.set_num_threads(s.threads)
            self.base = load_base(s.model, s.cache_dir, s.device, s.dtype)
            self.store = AdapterStore(s.store)
            self.store.cleanup_temp()
            model_len = int(getattr(self.base.model.config, "max_position_embeddings", 2048))
            max_len = min(model_len, s.max_model_len) if s.max_model_len else min(model_len, 2048)
            runner = ModelRunner(self.base.model, max_rows=s.max_batch_size, max_len=max_len)
            self.registry = Registry(self.store, self.base.model, self.base.fingerprint, self.base.device,
                                     self.metrics, projection_layout(self.base.model), s.max_tasks)
            started = time.monotonic()
            state = self.registry.refresh()
            log.info("loaded %d stored adapter(s) in %.1f s", len(state.tasks), time.monotonic() - started)
            # built only where the engine would use it
            use_kernel = s.sparse_kernel and applies_to(runner.device, runner.dtype)
            kernel = load_kernel(s.cache_dir / "kernels") if use_kernel else None
            self.engine = Engine(runner, self.base.tokenizer, state, self.metrics, max_batch=s.max_batch_size,
                                 max_queue=s.max_queue, max_len=max_len, prefill_budget=s.prefill_budget,
                                 max_prompt_tokens=s.max_prompt_tokens, max_new_tokens=s.max_new_tokens_limit,
                                 sparse_kernel=kernel, cuda_graphs=s.cuda_graphs,
                                 triton=s.sparse_kernel, merged_mb=s.merged_weights_mb,
                                 merged_min_steps=s.merged_weights_min_steps)
            self.jobs = JobManager(
                JobFiles(self.store.root / ".jobs"), self._worker_command(), self.store.exists, self.store.manifest,
                self._register, self.metrics,
                worker_env={"OMP_NUM_THREADS": str(s.train_threads), "TOKENIZERS_PARALLELISM": "false"},
                on_training=self._share_cores, unserved=self.registry.why_unserved,
                max_queued=s.max_queued_jobs, max_seconds=s.max_job_seconds, retention_s=s.job_retention_s,
                max_records=s.max_job_records)
            self.jobs.start()
            threading.Thread(target=self._watch_store, name="store-watch", daemon=True).start()
        except Exception as e:  # reported by /readyz and by every route that needs the model
            log.exception("startup failed")
            self.load_error = str(e)
            return
        self.ready.set()
        self.engine.run()

    def _worker_command(self) -> list[str]:
        import sys

        s = self.settings
        return [sys.executable, "-m", "server.worker", "--store", str(self.store.root), "--model",
                str(self.base.path), "--fingerprint", self.base.fingerprint, "--device", self.base.device.type,
                "--dtype", s.dtype, "--threads", str(s.train_threads)]

    def _share_cores(self, training: bool) -> None:
        """While a worker trains here, serve with the cores it leaves (2 cores: 1 each). Two OpenMP pools
        oversubscribing the cores made serving about 3x slower (p50 of an 8-token generate 0.18 s -> 0.59 s
        with training beside it); each owning its cores keeps it to about the cost of one thread less."""
        serving = self.settings.threads or os.cpu_count() or 1
        if training:
            serving = max(1, serving - self.settings.train_threads)
        self.engine.set_threads(serving)

    def _register(self) -> None:
        """Load what the store gained and serve it from the engine's next step; observe, per new task, the time
        from its folder's appearance in the store (the atomic rename) to this hand-over."""
        before = set(self.engine.state.tasks)
        state = self.registry.refresh()
        if state is None:
            return
        self.engine.set_state(state)
        now = time.time()
        for name in set(state.tasks) - before:
            try:
                self.metrics.register_seconds.observe(max(0.0, now - self.store.path(name).stat().st_mtime))
            except OSError:
                pass

    def _watch_store(self) -> None:
        """Serve adapters that another process sharing the store registered (and drop removed ones) within
        ``store_poll_seconds``. This loop only lists the store; the refresh runs torch ops (``run_isolated``)."""
        while not self._closing.wait(self.settings.store_poll_seconds):
            try:
                if self.registry.pending():
                    run_isolated(self._register, "register")
            except Exception:
                log.exception("store refresh failed")

    def delete_task(self, name: str):
        """Move a task's adapter to the store's trash and serve the rest (``@stack`` recomputed)."""
        trashed = self.store.trash(name)
        run_isolated(self._register, "register")
        return trashed

    def close(self) -> None:
        self._closing.set()
        if self.jobs is not None:
            self.jobs.stop()
        if self.engine is not None:
            self.engine.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.run, name="model", daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="jumplora-server", version="0.1.0", lifespan=lifespan,
                  description="Serve one frozen LM through many sparse JumpLoRA task adapters.")
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, settings=settings)
    app.include_router(router)
    return app
