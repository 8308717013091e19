"""Pydantic models of the HTTP API and of a training job's configuration."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """How one task's adapter is trained. Defaults are the reference defaults of DESIGN.md §2."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["jumplora", "lora"] = "jumplora"
    regularizer: Literal["incremental", "ella"] = "incremental"
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(32.0, gt=0, le=4096)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=16)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=1024)
    max_steps: int | None = Field(None, ge=1, le=1_000_000)
    threshold_mode: Literal["global", "per_block"] = "global"
    ella_lambda: float = Field(3e4, ge=0, le=1e9)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_seq_len: int = Field(512, ge=8, le=32768)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field("@base", min_length=1, max_length=64)
    prompt: str
    max_new_tokens: int = Field(32, ge=1, le=4096)


class GenerateResponse(BaseModel):
    task: str
    text: str
