"""The HTTP API on a real server process on loopback, with the tiny model and adapters in a real store."""
from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from adapters_store import AdapterStore
from benchmarks.loopback import ServerProcess
from support import put_task, task_deltas

TASKS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tiny_base, tmp_path_factory):
    """A server over a store holding three sparse tasks plus a corrupt and a foreign adapter."""
    root = tmp_path_factory.mktemp("api")
    store = AdapterStore(root / "store")
    for order, name in enumerate(TASKS):
        put_task(store, name, task_deltas(tiny_base.model, 0.03, seed=10 + order), tiny_base.fingerprint, order)
    put_task(store, "foreign", task_deltas(tiny_base.model, 0.03, seed=20), "0" * 64, 3)
    put_task(store, "corrupt", task_deltas(tiny_base.model, 0.03, seed=21), tiny_base.fingerprint, 4)
    blob = store.path("corrupt") / "adapter.safetensors"
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    server = ServerProcess(tiny_model_dir, root / "store", root / "cache",
                           extra_args=["--max-batch-size", "4", "--max-queue", "2"]).wait_ready()
    yield server
    server.stop()


def gen(server, **body):
    return httpx.post(server.url + "/v1/generate", json=body, timeout=60)


def sse_events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_generate_every_task_stack_and_base(served):
    texts = {}
    for task in TASKS + ["@stack", "@base"]:
        r = gen(served, task=task, prompt="hello there", max_new_tokens=8)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task and body["finish_reason"] in ("length", "eos")
        assert body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 0
        texts[task] = body["text"]
    assert len(set(texts.values())) > 1  # adapters change what is generated


def test_streaming_sends_one_event_per_token_then_the_final_one(served):
    plain = gen(served, task="beta", prompt="stream me", max_new_tokens=12).json()
    with httpx.stream("POST", served.url + "/v1/generate", timeout=60,
                      json={"task": "beta", "prompt": "stream me", "max_new_tokens": 12, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    tokens, last = events[:-1], events[-1]
    assert all(e["type"] == "token" for e in tokens) and last["type"] == "done"
    assert len(tokens) == last["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert "".join(e["text"] for e in tokens) + last["delta"] == last["text"] == plain["text"]
    assert last["finish_reason"] == plain["finish_reason"]


def test_openai_client_completions_models_and_streaming(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    ids = {m.id for m in client.models.list().data}
    assert ids == set(TASKS) | {"@stack", "@base"}
    plain = gen(served, task="gamma", prompt="open ai", max_new_tokens=10).json()
    c = client.completions.create(model="gamma", prompt="open ai", max_tokens=10, temperature=0)
    assert c.choices[0].text == plain["text"]
    assert c.choices[0].finish_reason == ("length" if plain["finish_reason"] == "length" else "stop")
    assert c.usage.completion_tokens == plain["usage"]["completion_tokens"]
    pieces = [ch.choices[0].text for ch in client.completions.create(model="gamma", prompt="open ai", max_tokens=10,
                                                                     temperature=0, stream=True)]
    assert "".join(pieces) == plain["text"]
    with httpx.stream("POST", served.url + "/v1/completions", timeout=60,
                      json={"model": "gamma", "prompt": "open ai", "max_tokens": 3, "stream": True}) as r:
        assert sse_events(r)[-1] == "[DONE]"
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_tasks_listing_and_detail(served):
    tasks = httpx.get(served.url + "/v1/tasks").json()["tasks"]
    assert [t["name"] for t in tasks] == TASKS  # the corrupt and the foreign adapters are not served
    first = tasks[0]
    assert first["method"] == "jumplora" and first["regularizer"] == "incremental" and first["order"] == 0
    assert first["targets"] == ["q_proj", "v_proj"] and 0.01 < first["density"] < 0.05
    assert first["nonzero_params"] > 0 and first["overlap_ratio"] == 0.0
    assert tasks[1]["overlap_ratio"] > 0.0  # random deltas collide with the earlier task's positions
    detail = httpx.get(served.url + "/v1/tasks/beta").json()
    assert detail["name"] == "beta" and len(detail["tensors_sha256"]) == 64 and "created_at" in detail
    missing = httpx.get(served.url + "/v1/tasks/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_errors_are_json_with_the_right_codes(served):
    r = gen(served, task="nope", prompt="x")
    assert r.status_code == 404 and r.json()["error"]["param"] == "task" and "nope" in r.json()["error"]["message"]
    r = gen(served, task="alpha", prompt="x", temperature=-1)
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
    r = gen(served, task="alpha", prompt="x", unknown_field=1)
    assert r.status_code == 422 and r.json()["error"]["param"] == "unknown_field"
    r = gen(served, task="alpha", prompt="hi", max_new_tokens=510)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "510" in msg and re.search(r"\b512\b", msg), msg
    r = httpx.post(served.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "n": 2})
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"
    r = httpx.get(served.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_full_queue_is_429_with_retry_after(served):
    """4 rows and 2 queue places: a burst of 12 long requests gets some 429s, and the rest complete."""
    results = []

    def one():
        results.append(gen(served, task="@base", prompt="busy " * 5, max_new_tokens=120))
    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    refused = next(r for r in results if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"


def test_disconnecting_client_frees_its_row(served):
    def running():
        text = httpx.get(served.url + "/metrics").text
        return float(re.search(r"^jumplora_running_batch_size (\S+)$", text, re.M).group(1))

    with httpx.stream("POST", served.url + "/v1/generate", timeout=60,
                      json={"task": "alpha", "prompt": "go", "max_new_tokens": 500, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)  # generation is under way
        deadline = time.monotonic() + 5
        while running() != 1:
            assert time.monotonic() < deadline, "the request never showed as running"
            next(lines)
    deadline = time.monotonic() + 10
    while running() != 0:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.05)
    assert re.search(r'jumplora_requests_total\{endpoint="generate",status="499",task="alpha"\} [1-9]',
                     httpx.get(served.url + "/metrics").text)


def test_metrics_have_real_labels(served):
    gen(served, task="alpha", prompt="measure", max_new_tokens=4)
    text = httpx.get(served.url + "/metrics").text
    for pattern in [
        r'jumplora_request_duration_seconds_bucket\{endpoint="generate",le="[^"]+",task="alpha"\}',
        r'jumplora_time_to_first_token_seconds_count\{task="alpha"\} [1-9]',
        r'jumplora_generated_tokens_total\{task="alpha"\} [1-9]',
        r'jumplora_requests_total\{endpoint="generate",status="200",task="alpha"\} [1-9]',
        r'jumplora_adapter_density\{task="beta"\} 0\.0[1-4]',
        r'jumplora_adapter_nonzero_params\{task="gamma"\} [1-9]',
        r'jumplora_adapter_overlap_ratio\{task="alpha"\} 0\.0',
        r'jumplora_adapter_load_errors_total\{reason="ForeignAdapter",task="foreign"\} 1\.0',
        r'jumplora_adapter_load_errors_total\{reason="CorruptAdapter",task="corrupt"\} 1\.0',
        r"jumplora_queue_length 0\.0",
    ]:
        assert re.search(pattern, text), pattern
    assert 'task="foreign"' not in "\n".join(l for l in text.splitlines() if l.startswith("jumplora_adapter_d"))
