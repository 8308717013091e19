"""The Python client: ``Client`` (blocking, over ``httpx.Client``) and ``AsyncClient`` (over ``httpx.AsyncClient``)
with the same methods. Both speak the HTTP API of README.md and turn error answers into the typed errors of
``client.errors``. Imports nothing of the server and not torch.

    from client import Client
    with Client() as c:                                   # JUMPLORA_URL, else http://127.0.0.1:8000
        print(c.generate("@base", "Hello", max_new_tokens=8).text)
        job = c.learn("toy", [{"prompt": "2+2=", "completion": " 4"}], config={"epochs": 3})
        job.wait(on_progress=lambda j: print(j.step, j.total_steps, j.loss))
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, AsyncIterator, Callable, Iterable, Iterator
from urllib.parse import quote

import httpx

from . import errors
from .errors import (JobFailed, JumploraConnectionError, JumploraError, JumploraTimeoutError, UnsafeArchiveError)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 300.0
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
USER_AGENT = "jumplora-client/0.1"


def default_url(url: str | None = None) -> str:
    """``url``, else ``$JUMPLORA_URL``, else http://127.0.0.1:8000; ``http://`` is added when no scheme is given."""
    url = (url or os.environ.get("JUMPLORA_URL") or DEFAULT_URL).strip().rstrip("/")
    return url if "://" in url else "http://" + url


def default_api_key(api_key: str | None = None) -> str | None:
    return api_key if api_key is not None else (os.environ.get("JUMPLORA_API_KEY") or None)


# -- records ------------------------------------------------------------------------------------------------------

@dataclass
class _Record:
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the server's JSON, unknown fields included

    @classmethod
    def from_dict(cls, d: dict, **extra):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names and k != "raw"}, raw=dict(d), **extra)


@dataclass
class Generation(_Record):
    text: str = ""
    finish_reason: str | None = None  # "length", "stop" or "eos"
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens
    task: str | None = None


@dataclass
class Task(_Record):
    name: str = ""
    order: int | None = None
    method: str | None = None
    regularizer: str | None = None
    nonzero_params: int | None = None
    density: float | None = None
    overlap_ratio: float | None = None
    targets: list = field(default_factory=list)
    rank: int | None = None
    alpha: float | None = None
    metrics: dict = field(default_factory=dict)
    created_at: str | None = None
    parents: list = field(default_factory=list)  # only from task(name)
    route: list = field(default_factory=list)  # only from task(name): the tasks it is served with, itself last
    memory_bytes: int | None = None  # only from task(name)
    config: dict = field(default_factory=dict)  # only from task(name)
    base_fingerprint: str | None = None
    tensors_sha256: str | None = None


@dataclass
class Job(_Record):
    """A training job. ``wait()`` polls it until it is final; ``refresh()`` and ``cancel()`` update it in place."""

    id: str = ""
    task: str = ""
    status: str = "queued"  # queued, running, succeeded, failed, cancelled
    created_at: str | None = None
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
    n_rows: int | None = None
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    client: Any = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATES

    def _update(self, other: "Job") -> "Job":
        for f in dataclasses.fields(self):
            if f.name != "client":
                setattr(self, f.name, getattr(other, f.name))
        return self

    def _final(self) -> "Job":
        if self.status == "failed":
            raise JobFailed(self)
        return self

    def refresh(self) -> "Job":
        return self._update(self.client.job(self.id))

    def cancel(self) -> "Job":
        return self._update(self.client.cancel(self.id))

    def wait(self, poll: float = 1.0, timeout: float | None = None,
             on_progress: Callable[["Job"], None] | None = None) -> "Job":
        """Poll until the job is succeeded, failed or cancelled, calling ``on_progress(job)`` (a snapshot) whenever
        the record changed. Returns the final job (this object, updated); raises ``JobFailed`` if it failed and
        ``JumploraTimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            self.refresh()
            if self.raw != seen:
                seen = self.raw
                if on_progress is not None:
                    on_progress(copy.copy(self))
            if self.done:
                return self._final()
            time.sleep(_next_poll(self, poll, deadline))


@dataclass
class AsyncJob(Job):
    """``Job`` of an ``AsyncClient``: ``refresh``, ``cancel`` and ``wait`` are coroutines (``on_progress`` may be
    one too)."""

    async def refresh(self) -> "AsyncJob":
        return self._update(await self.client.job(self.id))

    async def cancel(self) -> "AsyncJob":
        return self._update(await self.client.cancel(self.id))

    async def wait(self, poll: float = 1.0, timeout: float | None = None, on_progress=None) -> "AsyncJob":
        import asyncio
        import inspect

        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            await self.refresh()
            if self.raw != seen:
                seen = self.raw
                if on_progress is not None and inspect.isawaitable(result := on_progress(copy.copy(self))):
                    await result
            if self.done:
                return self._final()
            await asyncio.sleep(_next_poll(self, poll, deadline))


def _next_poll(job: Job, poll: float, deadline: float | None) -> float:
    if deadline is None:
        return poll
    left = deadline - time.monotonic()
    if left <= 0:
        raise JumploraTimeoutError(f"job {job.id} is still {job.status} after the wait's timeout")
    return min(poll, left)


# -- requests shared by both clients --------------------------------------------------------------------------------

def _path(prefix: str, name: str) -> str:
    return f"{prefix}/{quote(str(name), safe='@')}"


def _generate_body(task: str, prompt: str, params: dict, stream: bool) -> dict:
    if "stream" in params:
        raise TypeError("pass no stream= parameter: use generate() or stream()")
    return {"task": task, "prompt": prompt, **{k: v for k, v in params.items() if v is not None}, "stream": stream}


def _complete_body(model: str, prompt: str, params: dict) -> dict:
    if params.get("stream"):
        raise TypeError("complete() does not stream; use stream() (the /v1/generate events) instead")
    return {"model": model, "prompt": prompt, **{k: v for k, v in params.items() if v is not None}}


def _learn_request(name: str, rows_or_path, config: dict | None) -> dict:
    """httpx keyword arguments of ``POST /v1/tasks``: JSON for rows, a multipart upload for a JSONL file."""
    if isinstance(rows_or_path, (str, os.PathLike)):
        path = Path(rows_or_path)
        data = {"name": name}
        if config is not None:
            data["config"] = json.dumps(config)
        return {"data": data, "files": {"file": (path.name, path.read_bytes(), "application/jsonl")}}
    if isinstance(rows_or_path, (bytes, dict)) or not isinstance(rows_or_path, Iterable):
        raise TypeError("learn() takes a list of {'prompt', 'completion'} rows or the path of a JSONL file")
    body = {"name": name, "data": list(rows_or_path)}
    if config is not None:
        body["config"] = config
    return {"json": body}


def _health(live: httpx.Response, ready: httpx.Response) -> dict:
    if live.status_code != 200:
        _raise_for_status(live)
    if ready.status_code not in (200, 503):
        _raise_for_status(ready)
    return {"live": True, "ready": ready.status_code == 200, "healthz": _json(live), "readyz": _json(ready)}


def _json(response: httpx.Response):
    try:
        return response.json()
    except ValueError:
        raise JumploraError(f"the server answered {response.request.url.path} with something that is not JSON: "
                            f"{response.text[:200]!r}") from None


def _raise_for_status(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        where = f"{response.request.method} {response.request.url.path}"
        raise errors.from_response(response.status_code, response.content, response.headers, where)
    return response


class _Common:
    def __init__(self, url: str | None, timeout: float | None, api_key: str | None):
        self.url = default_url(url)
        self.api_key = default_api_key(api_key)
        self.timeout = timeout
        headers = {"User-Agent": USER_AGENT}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        connect = 10.0 if timeout is None else min(timeout, 10.0)
        self._http_kwargs = {"base_url": self.url, "headers": headers,
                             "timeout": httpx.Timeout(timeout, connect=connect)}

    @contextlib.contextmanager
    def _transport_errors(self):
        """httpx's transport errors as ``JumploraConnectionError`` / ``JumploraTimeoutError`` naming the URL."""
        try:
            yield
        except httpx.ConnectTimeout:
            raise JumploraConnectionError(f"cannot connect to the jumplora server at {self.url}: timed out") from None
        except httpx.TimeoutException:
            raise JumploraTimeoutError(
                f"no answer from the jumplora server at {self.url} within {self.timeout} s") from None
        except httpx.ConnectError as e:
            raise JumploraConnectionError(f"cannot connect to the jumplora server at {self.url} ({e}); is it "
                                          "running? (set --url or JUMPLORA_URL)") from None
        except httpx.TransportError as e:
            raise JumploraConnectionError(f"connection to the jumplora server at {self.url} failed: "
                                          f"{e or type(e).__name__}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# -- streaming ------------------------------------------------------------------------------------------------------

class _SSEDecoder:
    """Server-sent events, line by line: ``feed`` returns an event's data when a blank line ends it."""

    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


_STATUS_OF_TYPE = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                   "not_found_error": 404, "conflict_error": 409, "payload_too_large_error": 413,
                   "rate_limit_error": 429, "not_ready_error": 503, "timeout_error": 504, "storage_error": 507}


class _StreamState:
    """What a /v1/generate event stream ended with: ``text`` (the whole text), ``finish_reason``, ``usage``."""

    def __init__(self, task: str):
        self.task = task
        self.text: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.done = False

    def _pieces(self, data: str) -> list[str]:
        try:
            event = json.loads(data)
        except ValueError:
            raise JumploraError(f"unexpected event in the server's stream: {data[:200]!r}") from None
        if not isinstance(event, dict):
            return []
        if "error" in event:  # the status line was already sent: the error comes as an event
            err = event["error"] if isinstance(event["error"], dict) else {}
            status = err.get("status") if isinstance(err.get("status"), int) else None
            raise errors.from_payload(event, status or _STATUS_OF_TYPE.get(err.get("type"), 500))
        if event.get("type") == "token":
            return [event["text"]] if event.get("text") else []
        if event.get("type") == "done":
            self.done = True
            self.text, self.finish_reason = event.get("text"), event.get("finish_reason")
            self.usage = event.get("usage")
            return [event["delta"]] if event.get("delta") else []  # text held back for a possible stop string
        return []

    def _ended(self) -> None:
        if not self.done:
            raise JumploraConnectionError("the server's stream ended before its final event")


class TextStream(_StreamState):
    """Iterator of the text pieces of a streamed generation; after it is exhausted, ``text``, ``finish_reason``
    and ``usage`` hold the final event's. ``close()`` (or leaving a ``with`` block) drops the request."""

    def __init__(self, client: "Client", body: dict):
        super().__init__(body["task"])
        self._it = self._run(client, body)

    def _run(self, client: "Client", body: dict) -> Iterator[str]:
        decoder = _SSEDecoder()
        with client._transport_errors(), client._http.stream("POST", "/v1/generate", json=body) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for_status(r)
            for line in r.iter_lines():
                data = decoder.feed(line)
                if data is not None:
                    yield from self._pieces(data)
                    if self.done:
                        return
            if (data := decoder.feed("")) is not None:
                yield from self._pieces(data)
        self._ended()

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncTextStream(_StreamState):
    """Async iterator of the text pieces of a streamed generation (see ``TextStream``)."""

    def __init__(self, client: "AsyncClient", body: dict):
        super().__init__(body["task"])
        self._it = self._run(client, body)

    async def _run(self, client: "AsyncClient", body: dict) -> AsyncIterator[str]:
        decoder = _SSEDecoder()
        with client._transport_errors():
            async with client._http.stream("POST", "/v1/generate", json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _raise_for_status(r)
                async for line in r.aiter_lines():
                    data = decoder.feed(line)
                    if data is not None:
                        for piece in self._pieces(data):
                            yield piece
                        if self.done:
                            return
                if (data := decoder.feed("")) is not None:
                    for piece in self._pieces(data):
                        yield piece
        self._ended()

    def __aiter__(self) -> "AsyncTextStream":
        return self

    async def __anext__(self) -> str:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        await self._it.aclose()

    async def __aenter__(self) -> "AsyncTextStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


# -- export: a tar stream of a checkpoint folder, extracted safely -----------------------------------------------------

def _member_path(member: tarfile.TarInfo) -> str | None:
    """The relative path a member may be extracted to (None for the archive's root), or UnsafeArchiveError."""
    name = member.name
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or posixpath.isabs(name):
        raise UnsafeArchiveError(f"refusing the archive: member {name!r} has an absolute path")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing the archive: member {name!r} points outside the output folder")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"refusing the archive: member {name!r} is not a plain file or folder")
    return "/".join(parts) or None


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JumploraError(f"{out} already exists and is not an empty folder")


def extract_checkpoint(archive, out_dir: str | os.PathLike) -> list[str]:
    """Extract a tar archive (a path or a binary file object) into ``out_dir`` (absent or empty), refusing
    absolute paths, ``..``, links and devices before anything is written; files are written into a temporary
    sibling folder that is renamed to ``out_dir`` at the end. Returns the extracted files' relative paths."""
    out = Path(out_dir)
    _check_out_dir(out)
    try:
        tar = tarfile.open(archive, "r:*") if isinstance(archive, (str, os.PathLike)) else \
            tarfile.open(fileobj=archive, mode="r:*")
    except tarfile.TarError as e:
        raise JumploraError(f"the export is not a readable tar archive ({e})") from None
    with tar:
        members = [(m, _member_path(m)) for m in tar.getmembers()]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            written = []
            for member, rel in members:
                if rel is None:
                    continue
                target = tmp / rel
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                written.append(rel)
            tmp.chmod(0o755)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return sorted(set(written))


# -- the clients ------------------------------------------------------------------------------------------------------

class Client(_Common):
    """Blocking client. ``url`` defaults to ``$JUMPLORA_URL``, else http://127.0.0.1:8000; ``api_key`` (default
    ``$JUMPLORA_API_KEY``) is sent as ``Authorization: Bearer``. Use as a context manager or call ``close()``."""

    def __init__(self, url: str | None = None, timeout: float | None = DEFAULT_TIMEOUT, api_key: str | None = None):
        super().__init__(url, timeout, api_key)
        self._http = httpx.Client(**self._http_kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        with self._transport_errors():
            response = self._http.request(method, path, **kw)
        return _raise_for_status(response)

    def generate(self, task: str, prompt: str, **params) -> Generation:
        """Generate text through ``task`` (a task name, ``@stack`` or ``@base``); ``params`` are the fields of
        ``POST /v1/generate``: max_new_tokens, temperature, top_p, top_k, seed, stop."""
        return Generation.from_dict(_json(self._request("POST", "/v1/generate",
                                                        json=_generate_body(task, prompt, params, False))))

    def stream(self, task: str, prompt: str, **params) -> TextStream:
        """Like ``generate``, as an iterator of text pieces (the request starts at the first ``next``)."""
        return TextStream(self, _generate_body(task, prompt, params, True))

    def complete(self, model: str, prompt: str, **params) -> dict:
        """The OpenAI-compatible ``POST /v1/completions``; returns its JSON (``choices[0]["text"]``, ``usage``)."""
        return _json(self._request("POST", "/v1/completions", json=_complete_body(model, prompt, params)))

    def models(self) -> list[str]:
        """The names a request may use: ``@base``, ``@stack`` and every served task."""
        return [m["id"] for m in _json(self._request("GET", "/v1/models"))["data"]]

    def tasks(self) -> list[Task]:
        return [Task.from_dict(t) for t in _json(self._request("GET", "/v1/tasks"))["tasks"]]

    def task(self, name: str) -> Task:
        return Task.from_dict(_json(self._request("GET", _path("/v1/tasks", name))))

    def delete_task(self, name: str) -> dict:
        """Stop serving a task (the server moves its folder to the store's trash); returns ``{name, trash}``."""
        return _json(self._request("DELETE", _path("/v1/tasks", name)))

    def learn(self, name: str, rows_or_path, config: dict | None = None) -> Job:
        """Queue a training job for a new task from a list of ``{"prompt", "completion"}`` rows (sent as JSON) or
        the path of a JSONL file (uploaded). Returns the queued ``Job``; ``job.wait()`` follows it."""
        accepted = _json(self._request("POST", "/v1/tasks", **_learn_request(name, rows_or_path, config)))
        return Job.from_dict({"id": accepted["job_id"], **accepted}, client=self)

    def jobs(self) -> list[Job]:
        return [Job.from_dict(j, client=self) for j in _json(self._request("GET", "/v1/jobs"))["jobs"]]

    def job(self, job_id: str) -> Job:
        return Job.from_dict(_json(self._request("GET", _path("/v1/jobs", job_id))), client=self)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job (at once) or a running one (its status turns ``cancelled`` when it stopped)."""
        return Job.from_dict(_json(self._request("DELETE", _path("/v1/jobs", job_id))), client=self)

    def health(self) -> dict:
        """``{"live", "ready", "healthz", "readyz"}`` from ``GET /healthz`` and ``GET /readyz`` (a 503 of
        /readyz while the model loads is ``ready: False``, not an error)."""
        with self._transport_errors():
            live, ready = self._http.get("/healthz"), self._http.get("/readyz")
        return _health(live, ready)

    def export(self, name: str, out_dir: str | os.PathLike, timeout: float | None = 3600.0) -> list[str]:
        """Download ``GET /v1/export/{name}`` (a task or ``@stack`` merged into the base, as a transformers
        checkpoint tar) and extract it safely into ``out_dir``. Returns the files written."""
        _check_out_dir(Path(out_dir))
        with tempfile.TemporaryFile() as tmp:
            with self._transport_errors(), self._http.stream("GET", _path("/v1/export", name),
                                                            timeout=httpx.Timeout(timeout, connect=10.0)) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_status(r)
                for chunk in r.iter_bytes(1 << 20):
                    tmp.write(chunk)
            tmp.seek(0)
            return extract_checkpoint(tmp, out_dir)


class AsyncClient(_Common):
    """The same methods as ``Client``, as coroutines (``stream`` returns an async iterator). Use with
    ``async with`` or call ``aclose()``."""

    def __init__(self, url: str | None = None, timeout: float | None = DEFAULT_TIMEOUT, api_key: str | None = None):
        super().__init__(url, timeout, api_key)
        self._http = httpx.AsyncClient(**self._http_kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        with self._transport_errors():
            response = await self._http.request(method, path, **kw)
        return _raise_for_status(response)

    async def generate(self, task: str, prompt: str, **params) -> Generation:
        return Generation.from_dict(_json(await self._request("POST", "/v1/generate",
                                                              json=_generate_body(task, prompt, params, False))))

    def stream(self, task: str, prompt: str, **params) -> AsyncTextStream:
        return AsyncTextStream(self, _generate_body(task, prompt, params, True))

    async def complete(self, model: str, prompt: str, **params) -> dict:
        return _json(await self._request("POST", "/v1/completions", json=_complete_body(model, prompt, params)))

    async def models(self) -> list[str]:
        return [m["id"] for m in _json(await self._request("GET", "/v1/models"))["data"]]

    async def tasks(self) -> list[Task]:
        return [Task.from_dict(t) for t in _json(await self._request("GET", "/v1/tasks"))["tasks"]]

    async def task(self, name: str) -> Task:
        return Task.from_dict(_json(await self._request("GET", _path("/v1/tasks", name))))

    async def delete_task(self, name: str) -> dict:
        return _json(await self._request("DELETE", _path("/v1/tasks", name)))

    async def learn(self, name: str, rows_or_path, config: dict | None = None) -> AsyncJob:
        accepted = _json(await self._request("POST", "/v1/tasks", **_learn_request(name, rows_or_path, config)))
        return AsyncJob.from_dict({"id": accepted["job_id"], **accepted}, client=self)

    async def jobs(self) -> list[AsyncJob]:
        return [AsyncJob.from_dict(j, client=self) for j in _json(await self._request("GET", "/v1/jobs"))["jobs"]]

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob.from_dict(_json(await self._request("GET", _path("/v1/jobs", job_id))), client=self)

    async def cancel(self, job_id: str) -> AsyncJob:
        return AsyncJob.from_dict(_json(await self._request("DELETE", _path("/v1/jobs", job_id))), client=self)

    async def health(self) -> dict:
        with self._transport_errors():
            live, ready = await self._http.get("/healthz"), await self._http.get("/readyz")
        return _health(live, ready)

    async def export(self, name: str, out_dir: str | os.PathLike, timeout: float | None = 3600.0) -> list[str]:
        import asyncio

        _check_out_dir(Path(out_dir))
        with tempfile.TemporaryFile() as tmp:
            with self._transport_errors():
                async with self._http.stream("GET", _path("/v1/export", name),
                                             timeout=httpx.Timeout(timeout, connect=10.0)) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        _raise_for_status(r)
                    async for chunk in r.aiter_bytes(1 << 20):
                        tmp.write(chunk)
            tmp.seek(0)
            return await asyncio.to_thread(extract_checkpoint, tmp, out_dir)
