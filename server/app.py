"""``create_app(settings)``: the FastAPI application. The model loads in a background thread started by the
lifespan, so that /healthz answers at once and /readyz says 503 until the model is ready."""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from . import api
from .config import Settings
from .errors import install_error_handlers
from .model import load_base

log = logging.getLogger(__name__)


class ServerState:
    """Everything the routes reach through ``app.state.server``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.base = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.generate_lock = threading.Lock()

    def load(self) -> None:
        try:
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            self.base = load_base(self.settings.model, self.settings.cache_dir, self.settings.device,
                                  self.settings.dtype)
            self.ready.set()
        except Exception as e:  # reported by /readyz and every route that needs the model
            log.exception("model failed to load")
            self.load_error = str(e)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.load, name="model-loader", daemon=True)
        loader.start()
        yield

    app = FastAPI(title="jumplora-server", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(api.router)
    return app
