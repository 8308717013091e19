"""Pydantic models of the HTTP API and of a training job's configuration."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters_store import TASK_NAME_RE, is_task_name


# The projections of a decoder block that the serving engine applies adapter deltas to (server/runner.py's
# groups); an adapter on any other layer (lm_head, embeddings) would be stored but never served.
SERVED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    gate: Literal["budget", "adaptive"] = Field(
        "budget", description="budget: after 0.2·S, θ is set again at every step and before export so that at "
        "most N_LoRA entries (a rank-r LoRA's parameter count) pass the gate; adaptive: the paper's learned θ "
        "from 0.2·S on, which lets the density grow with ΔW (7-39 % on SmolLM2 in our runs)")
    parent: str = Field(
        "@stack", description="what the new task is trained on top of, and served with: @stack (every task "
        "served now: continual learning), @base (the base alone: an independent task) or a task's name (that "
        "task's route: a branch)")
    ella_lambda: float = Field(3e4, ge=0, le=1e9)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_seq_len: int = Field(512, ge=8, le=32768)

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        unserved = [t for t in v if t not in SERVED_PROJECTIONS]
        if unserved:
            raise ValueError(f"{unserved[0]!r} is not a projection the engine serves adapters on "
                             f"(one of {', '.join(SERVED_PROJECTIONS)})")
        if len(set(v)) != len(v):
            raise ValueError("a target is listed twice")
        return v

    @field_validator("parent")
    @classmethod
    def _parent(cls, v: str) -> str:
        if v in ("@stack", "@base") or is_task_name(v):
            return v
        raise ValueError("must be @stack, @base or the name of a served task")


Stop = str | list[str] | None


class SamplingFields(BaseModel):
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100_000, description="0 turns top-k off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Stop = Field(None, description="a string or up to 8 strings that end the generation")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Stop) -> Stop:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 8:
            raise ValueError("at most 8 stop strings")
        if any(len(s) > 256 for s in items):
            raise ValueError("stop strings are at most 256 characters")
        return v


def stop_list(stop: Stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    task: str = Field("@base", min_length=1, max_length=64, description="a task name, '@stack' or '@base'")
    prompt: str
    max_new_tokens: int = Field(32, ge=1, le=32768)
    stream: bool = False
    ignore_eos: bool = Field(False, description="generate max_new_tokens even past end-of-sequence (benchmarks)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task: str
    text: str
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage


class CompletionRequest(BaseModel):
    """The OpenAI completions request; fields this server does not implement are accepted only at their
    neutral values."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64, description="a task name, '@stack' or '@base'")
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    best_of: Literal[1] | None = None
    stream: bool = False
    stream_options: dict | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    echo: Literal[False] = False
    logprobs: None = None
    logit_bias: dict | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    suffix: None = None
    user: str | None = None
    top_k: int = Field(0, ge=0, le=100_000, description="extension: 0 turns top-k off")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Stop) -> Stop:
        return SamplingFields._stops(v)

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TaskSummary(BaseModel):
    name: str
    created_at: str | None = None
    method: str | None = None
    regularizer: str | None = None
    order: int
    nonzero_params: int
    density: float
    overlap_ratio: float
    targets: list[str] = Field(default_factory=list)
    rank: int | None = None
    alpha: float | None = None
    metrics: dict = Field(default_factory=dict)
    trained_on_deleted: list[str] = Field(default_factory=list,
                                          description="earlier tasks this one was trained on top of that were deleted")


class TaskDeleted(BaseModel):
    name: str
    trash: str


class TaskDetail(TaskSummary):
    parents: list[dict] = Field(default_factory=list)
    route: list[str] = Field(default_factory=list, description="the tasks whose deltas a request naming this "
                             "task is served with: its parents, then itself")
    memory_bytes: int = Field(0, description="memory of its served delta")
    config: dict = Field(default_factory=dict)
    base_fingerprint: str | None = None
    tensors_sha256: str | None = None


class TaskList(BaseModel):
    tasks: list[TaskSummary]


class LearnAccepted(BaseModel):
    job_id: str
    task: str
    status: str
    status_url: str


class JobInfo(BaseModel):
    id: str
    task: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    density: float | None = None
    threshold: float | None = None
    eta_s: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    n_rows: int
    config: dict
    metrics: dict = Field(default_factory=dict)


class JobList(BaseModel):
    jobs: list[JobInfo]


def _inline_refs(schema: dict) -> dict:
    """A JSON schema with its ``$defs`` substituted in place (OpenAPI cannot follow pydantic's local refs)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(dict(defs[node["$ref"].rsplit("/", 1)[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(schema)


def learn_openapi() -> dict:
    """The request body of ``POST /v1/tasks`` for the OpenAPI document (the route parses it itself to accept
    both JSON and a multipart upload)."""
    row = {"type": "object", "required": ["prompt", "completion"],
           "properties": {"prompt": {"type": "string"}, "completion": {"type": "string"}}}
    config = _inline_refs(TrainConfig.model_json_schema())
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["name", "data"], "properties": {
            "name": {"type": "string", "pattern": TASK_NAME_RE},
            "data": {"type": "array", "items": row, "minItems": 1}, "config": config}}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["name", "file"], "properties": {
            "name": {"type": "string"}, "file": {"type": "string", "format": "binary"},
            "config": {"type": "string", "description": "the training config as a JSON object"}}}},
    }}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in [
    (400, "bad request (e.g. prompt plus max_new_tokens over the context)"),
    (401, "missing or invalid API key"), (403, "the key does not allow this route"),
    (404, "unknown task, job or route"), (409, "conflict (a taken task name, a finished job)"),
    (413, "request, prompt or dataset over its limit"), (422, "invalid field (param names it)"),
    (429, "queue or streams full (see Retry-After)"), (500, "internal error"),
    (503, "not ready (model loading)"), (504, "request timeout"),
    (507, "the adapter store cannot be written (full or read-only)")]}


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model: str | None = None
    tasks: int | None = None
    jobs: str | None = Field(None, description='the jobs thread: "ok", or "failing: <why>" while it retries')
    detail: str | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
