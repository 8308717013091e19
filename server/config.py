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

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: Path | None = Field(None, description="Local transformers causal-LM folder; default: SmolLM2-135M-Instruct")
    store: Path = Field(default_factory=lambda: _home(".local", "share", "jumplora", "store"))
    cache_dir: Path = Field(default_factory=lambda: _home(".cache", "jumplora"))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads for serving (default: torch's)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
