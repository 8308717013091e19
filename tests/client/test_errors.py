"""Error mapping, stream edge cases and Job.wait against a fake server that answers what each test scripts."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

import client as jc
from client import Client


def error(message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param}}


@pytest.mark.parametrize("status,cls", [
    (400, jc.BadRequestError), (401, jc.AuthenticationError), (403, jc.PermissionDeniedError),
    (404, jc.NotFoundError), (409, jc.ConflictError), (413, jc.PayloadTooLargeError),
    (422, jc.InvalidRequestError), (429, jc.RateLimitError), (500, jc.ServerError), (502, jc.ServerError),
    (503, jc.NotReadyError), (504, jc.RequestTimeoutError),
])
def test_each_status_maps_to_its_error(fake, status, cls):
    fake.routes[("POST", "/v1/generate")] = (status, error(f"went wrong {status}", "some_type", "prompt"),
                                             {"Retry-After": "3"})
    with Client(fake.url) as c, pytest.raises(cls) as e:
        c.generate("@base", "hi")
    assert type(e.value) is cls
    assert (e.value.message, e.value.type, e.value.param, e.value.status) == (
        f"went wrong {status}", "some_type", "prompt", status)
    assert str(e.value) == f"went wrong {status}" and isinstance(e.value, jc.JumploraError)
    if cls is jc.RateLimitError:
        assert e.value.retry_after == 3.0
    if status == 504:
        assert isinstance(e.value, TimeoutError)


def test_an_error_without_json_still_has_a_message(fake):
    fake.routes[("GET", "/v1/models")] = (502, b"<html>bad gateway</html>", {})
    with Client(fake.url) as c, pytest.raises(jc.ServerError) as e:
        c.models()
    assert e.value.status == 502 and e.value.message == "HTTP 502: <html>bad gateway</html> (GET /v1/models)"
    fake.routes[("GET", "/v1/models")] = (404, {"error": {"message": "Not Found", "type": "http_error",
                                                          "param": None}}, {})
    with Client(fake.url) as c, pytest.raises(jc.NotFoundError, match=r"^Not Found \(GET /v1/models\)$"):
        c.models()


def sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def test_stream_yields_held_back_delta_and_raises_error_events(fake):
    done = {"type": "done", "task": "t", "delta": "C", "text": "ABC", "finish_reason": "stop",
            "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    fake.routes[("POST", "/v1/generate")] = [
        (200, sse({"type": "token", "text": "A", "token_id": 1}, {"type": "token", "text": "B", "token_id": 2}, done),
         {"content-type": "text/event-stream"}),
        (200, sse({"type": "token", "text": "A", "token_id": 1}, error("engine died", "internal_error")),
         {"content-type": "text/event-stream"}),
        (200, sse({"type": "token", "text": "A", "token_id": 1}), {"content-type": "text/event-stream"}),
    ]
    with Client(fake.url) as c:
        stream = c.stream("t", "p", max_new_tokens=3, stop=["D"])
        assert list(stream) == ["A", "B", "C"] and stream.text == "ABC" and stream.finish_reason == "stop"
        sent = json.loads(fake.requests[-1][3])
        assert sent == {"task": "t", "prompt": "p", "max_new_tokens": 3, "stop": ["D"], "stream": True}
        got = []
        with pytest.raises(jc.ServerError) as e:
            for piece in c.stream("t", "p"):
                got.append(piece)
        assert got == ["A"] and e.value.message == "engine died" and e.value.type == "internal_error"
        with pytest.raises(jc.JumploraConnectionError, match="before its final event"):
            list(c.stream("t", "p"))


def _job(status: str, step: int, error: str | None = None) -> dict:
    return {"id": "job-9", "task": "t", "status": status, "created_at": "x", "step": step, "total_steps": 4,
            "loss": 1.0, "density": 0.01, "error": error, "n_rows": 2, "config": {}, "metrics": {}}


def test_job_wait_reports_changes_and_raises_when_the_job_failed(fake):
    fake.routes[("GET", "/v1/jobs/job-9")] = [(200, _job("running", 1), {}), (200, _job("running", 1), {}),
                                              (200, _job("running", 3), {}), (200, _job("failed", 3, "oom"), {})]
    seen = []
    with Client(fake.url) as c:
        job = c.job("job-9")
        assert (job.id, job.status, job.step, job.total_steps) == ("job-9", "running", 1, 4)
        with pytest.raises(jc.JobFailed) as e:
            job.wait(poll=0.01, on_progress=lambda j: seen.append((j.status, j.step)))
    assert seen == [("running", 1), ("running", 3), ("failed", 3)]  # the repeated record is not reported
    assert e.value.job.error == "oom" and "oom" in e.value.message and job.status == "failed"


def test_job_wait_times_out(fake):
    fake.routes[("GET", "/v1/jobs/job-9")] = (200, _job("running", 1), {})
    with Client(fake.url) as c, pytest.raises(jc.JumploraTimeoutError, match="job-9 is still running"):
        c.job("job-9").wait(poll=0.05, timeout=0.3)


def test_health_while_loading_and_the_api_key_header(fake):
    fake.routes[("GET", "/healthz")] = (200, {"status": "ok"}, {})
    fake.routes[("GET", "/readyz")] = (503, {"status": "not ready", "detail": "the model is loading"}, {})
    with Client(fake.url, api_key="k-123") as c:
        health = c.health()
    assert health == {"live": True, "ready": False, "healthz": {"status": "ok"},
                      "readyz": {"status": "not ready", "detail": "the model is loading"}}
    assert fake.requests[-1][2]["authorization"] == "Bearer k-123"
    with Client(fake.url) as c:
        c.health()
    assert "authorization" not in fake.requests[-1][2]


def test_async_client_maps_errors_and_streams(fake):
    fake.routes[("GET", "/v1/tasks/x")] = (404, error("task 'x' is not served", "not_found_error", "name"), {})
    fake.routes[("POST", "/v1/generate")] = (200, sse({"type": "token", "text": "A", "token_id": 1},
                                                      error("too busy", "rate_limit_error")), {})

    async def main():
        async with jc.AsyncClient(fake.url, api_key="k") as c:
            with pytest.raises(jc.NotFoundError) as e:
                await c.task("x")
            assert e.value.param == "name"
            got = []
            with pytest.raises(jc.RateLimitError):
                async for piece in c.stream("t", "p"):
                    got.append(piece)
            assert got == ["A"]
    asyncio.run(main())
    assert fake.requests[0][2]["authorization"] == "Bearer k"


def test_connection_failure_names_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    url = f"http://127.0.0.1:{port}"
    with Client(url) as c, pytest.raises(jc.JumploraConnectionError) as e:
        c.models()
    assert url in str(e.value) and isinstance(e.value, ConnectionError)


def test_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("JUMPLORA_URL", "http://example.invalid:1234/")
    monkeypatch.setenv("JUMPLORA_API_KEY", "sekrit")
    with Client() as c:
        assert c.url == "http://example.invalid:1234" and c.api_key == "sekrit"
    monkeypatch.delenv("JUMPLORA_URL")
    monkeypatch.delenv("JUMPLORA_API_KEY")
    with Client() as c:
        assert c.url == "http://127.0.0.1:8000" and c.api_key is None
    with Client("localhost:9") as c:
        assert c.url == "http://localhost:9"
