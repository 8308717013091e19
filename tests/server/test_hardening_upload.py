"""Issue 14, second round: dataset uploads parsed off the event loop and one row at a time, the upload cap, every
payload field type-checked, one task-name rule (matched in full), every store error mapped, the key and the size
checked before any body is parsed, and /metrics behind whichever keys are set."""
from __future__ import annotations

import io
import json
import threading
import time
import tracemalloc

import httpx
import pytest

from support import toy_rows

READ, ADMIN = "read-key-hardening", "admin-key-hardening"
BODY_LIMIT, DATASET_LIMIT = 4096, 16_000_000


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def chunked(data: bytes, size: int = 1024):
    """A body without Content-Length: httpx sends a generator with Transfer-Encoding: chunked."""
    def parts():
        for i in range(0, len(data), size):
            yield data[i:i + size]
    return parts()


def just_over(limit: int, prefix: bytes, suffix: bytes) -> bytes:
    return prefix + b"x" * (limit + 100 - len(prefix) - len(suffix)) + suffix


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    from benchmarks.loopback import ServerProcess

    root = tmp_path_factory.mktemp("hardening")
    server = ServerProcess(tiny_model_dir, root / "store", root / "cache",
                           env={"JUMPLORA_API_KEY": READ, "JUMPLORA_ADMIN_KEY": ADMIN},
                           extra_args=["--max-body-bytes", str(BODY_LIMIT), "--max-dataset-bytes", str(DATASET_LIMIT),
                                       "--max-dataset-rows", "400000", "--max-concurrent-uploads", "1",
                                       "--metrics-auth", "true"]).wait_ready()
    yield server
    server.stop()


def error(r: httpx.Response) -> tuple[int, str | None, str]:
    assert r.headers["content-type"].startswith("application/json"), r.text
    e = r.json()["error"]
    return r.status_code, e["param"], e["message"]


# --- item 7: one name rule, matched in full; every store error mapped -----------------------------------------

def test_one_name_rule_matched_in_full():
    from adapters_store import InvalidTaskName, is_task_name
    from adapters_store.manifest import check_task_name as store_check
    from server.datasets import check_task_name
    from server.errors import InvalidRequest

    assert is_task_name("abc") and is_task_name("a.b_c-1")
    for bad in ("abc\n", "abc\r\n", "\nabc", "ABC", "@stack", "", "x" * 65, 5, None):
        assert not is_task_name(bad), bad
        with pytest.raises(InvalidRequest) as e:
            check_task_name(bad)
        assert e.value.param == "name"
        with pytest.raises(InvalidTaskName):
            store_check(bad)


def test_every_store_error_maps_to_a_4xx_or_507():
    from adapters_store import StoreError
    from server.errors import from_store_error

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    kinds = list(subclasses(StoreError))
    assert len(kinds) >= 8
    for kind in [StoreError, *kinds]:
        mapped = from_store_error(kind("abc\n", "why"))
        assert 400 <= mapped.status < 500 or mapped.status == 507, (kind, mapped.status)
        assert "why" in mapped.message
    codes = {k.__name__: from_store_error(k("t", "r")).status for k in kinds}
    assert (codes["InvalidTaskName"], codes["AdapterNotFound"], codes["AdapterExists"],
            codes["StoreWriteError"], codes["CorruptAdapter"]) == (422, 404, 409, 507, 507)


def test_a_name_with_a_newline_is_refused_on_every_route(keyed):
    url, rows = keyed.url, toy_rows()[:2]
    r = httpx.post(url + "/v1/tasks", headers=auth(ADMIN), json={"name": "abc\n", "data": rows})
    assert error(r)[:2] == (422, "name"), r.text
    jsonl = "".join(json.dumps(row) + "\n" for row in rows).encode()
    r = httpx.post(url + "/v1/tasks", headers=auth(ADMIN), data={"name": "abc\n"},
                   files={"file": ("rows.jsonl", jsonl)})
    assert error(r)[:2] == (422, "name"), r.text
    r = httpx.post(url + "/v1/tasks", headers=auth(ADMIN),
                   json={"name": "ok", "data": rows, "config": {"parent": "abc\n"}})
    assert error(r)[:2] == (422, "config.parent"), r.text
    for method, path, key in (("GET", "/v1/tasks/abc%0A", READ), ("DELETE", "/v1/tasks/abc%0A", ADMIN),
                              ("GET", "/v1/export/abc%0A", ADMIN)):
        r = httpx.request(method, url + path, headers=auth(key))
        assert error(r)[:2] == (404, "name"), (method, path, r.text)
    assert httpx.get(url + "/v1/jobs", headers=auth(ADMIN)).json()["jobs"] == []


# --- item 9: the key and the size before any parsing ----------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/generate", b"{not json"),
    ("/v1/generate", json.dumps({"prompt": 5, "max_new_tokens": "many"}).encode()),
    ("/v1/completions", b"{not json"),
    ("/v1/completions", json.dumps({"model": 5}).encode()),
    ("/v1/tasks", b"{not json"),
    ("/v1/tasks", json.dumps({"name": 5, "data": 5}).encode()),
])
def test_no_key_is_401_before_the_body_is_parsed(keyed, path, body):
    headers = {"content-type": "application/json"}
    r = httpx.post(keyed.url + path, content=body, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert httpx.post(keyed.url + path, content=body, headers={**headers, **auth("wrong")}).status_code == 401
    r = httpx.post(keyed.url + path, content=body, headers={**headers, **auth(ADMIN)})
    assert r.status_code == 422, r.text  # with the key, the body's own error


def test_a_read_key_on_the_dataset_route_is_403_before_the_body_is_parsed(keyed):
    r = httpx.post(keyed.url + "/v1/tasks", content=b"{not json",
                   headers={"content-type": "application/json", **auth(READ)})
    assert r.status_code == 403, r.text


def test_a_chunked_body_over_the_limit_is_413(keyed):
    url = keyed.url
    big = json.dumps({"task": "@base", "prompt": "x" * (2 * BODY_LIMIT), "max_new_tokens": 2}).encode()
    for path in ("/v1/generate", "/v1/completions"):
        r = httpx.post(url + path, content=chunked(big), headers={"content-type": "application/json",
                                                                    **auth(READ)})
        assert error(r)[0] == 413 and "limit" in error(r)[2], (path, r.text)
    # just over the limit, so that the client has sent (nearly) everything when the server answers
    dataset = just_over(DATASET_LIMIT, b'{"name": "big", "data": [{"prompt": "', b'", "completion": "c"}]}')
    r = httpx.post(url + "/v1/tasks", content=chunked(dataset, 1 << 16),
                   headers={"content-type": "application/json", **auth(ADMIN)}, timeout=60)
    assert error(r)[0] == 413, r.text
    form = just_over(DATASET_LIMIT + (1 << 20),
                     b'--bnd\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
                     b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="rows.jsonl"\r\n\r\n',
                     b"\r\n--bnd--\r\n")
    r = httpx.post(url + "/v1/tasks", content=chunked(form, 1 << 16), timeout=60,
                   headers={"content-type": "multipart/form-data; boundary=bnd", **auth(ADMIN)})
    assert error(r)[0] == 413, r.text
    # a body within the limit still works, chunked or not
    small = json.dumps({"task": "@base", "prompt": "hi", "max_new_tokens": 2}).encode()
    r = httpx.post(url + "/v1/generate", content=chunked(small, 8), headers={"content-type": "application/json",
                                                                             **auth(READ)})
    assert r.status_code == 200, r.text
    assert "unhandled error" not in keyed.log()


# --- item 13a: /metrics behind whichever keys are set ----------------------------------------------------------

def test_metrics_auth_takes_the_read_or_the_admin_key(keyed):
    url = keyed.url + "/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=auth("wrong")).status_code == 401
    assert httpx.get(url, headers=auth(READ)).status_code == 200
    assert httpx.get(url, headers=auth(ADMIN)).status_code == 200


def test_metrics_auth_with_only_an_admin_key(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, env={"JUMPLORA_ADMIN_KEY": ADMIN}, extra_args=["--metrics-auth", "true"])
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers=auth("wrong")).status_code == 401
    r = httpx.get(server.url + "/metrics", headers=auth(ADMIN))
    assert r.status_code == 200 and "jumplora_" in r.text
    assert httpx.get(server.url + "/v1/tasks").status_code == 200  # read routes stay open with only an admin key


def test_metrics_auth_without_any_key_is_refused_at_start():
    from pydantic import ValidationError

    from server.config import Settings

    with pytest.raises(ValidationError, match="metrics_auth"):
        Settings(metrics_auth=True, api_key=None, admin_key=None)
    assert Settings(metrics_auth=True, admin_key="k").metrics_auth


# --- item 3: field types, labels, memory, the upload cap ------------------------------------------------------

@pytest.mark.parametrize("label", ["pos", 3, 2.5, True, None])
def test_a_label_may_be_a_string_number_boolean_or_null(label):
    from server.datasets import Row, check_row

    assert check_row({"prompt": "p", "completion": "c", "label": label}, "data[0]") == Row("p", "c")


def test_every_payload_field_is_type_checked(keyed):
    url, h, rows = keyed.url, auth(ADMIN), toy_rows()[:2]

    def post(headers=(), **kw):
        return error(httpx.post(url + "/v1/tasks", headers={**h, **dict(headers)}, **kw))

    for body, param, needle in [
        ({"name": 5, "data": rows}, "name", "string"),
        ({"name": ["a"], "data": rows}, "name", "string"),
        ({"data": rows}, "name", "missing"),
        ({"name": "t"}, "data", "missing"),
        ({"name": "t", "data": "rows"}, "data", "list"),
        ({"name": "t", "data": {"prompt": "p"}}, "data", "list"),
        ({"name": "t", "data": rows, "config": [1]}, "config", "object"),
        ({"name": "t", "data": rows, "config": "epochs"}, "config", "object"),
        ({"name": "t", "data": rows + [{"prompt": "p", "completion": "c", "label": {"a": 1}}]}, "data[2].label",
         "string, number, boolean or null"),
        ({"name": "t", "data": rows + [{"prompt": "p", "completion": "c", "label": [1]}]}, "data[2].label", "list"),
        ({"name": "t", "data": rows + [["p", "c"]]}, "data[2]", "object"),
        ({"name": "t", "data": rows, "label": "x"}, "label", "unknown"),
    ]:
        code, got, message = post(json=body)
        assert (code, got) == (422, param) and needle in message, (body, code, got, message)
    for raw, param in [(b'{"name": "t", "name": "u", "data": []}', "name"), (b"[]", "body"), (b'"t"', "body"),
                       (b'{"name": "t", "data": [{"prompt": "p", "completion": "c"}]} x', "body"),
                       (b'{"name": "t", "data": [{"prompt": "p", "completion": "c"},]}', "body")]:
        code, got, _ = post(content=raw, headers={"content-type": "application/json"})
        assert (code, got) == (422, param), raw
    jsonl = b'{"prompt": "p", "completion": "c", "label": "x"}\n'
    assert post(data={"name": "t", "bogus": "1"}, files={"file": ("r.jsonl", jsonl)})[:2] == (422, "bogus")
    assert post(data={"name": "t", "config": "[1]"}, files={"file": ("r.jsonl", jsonl)})[:2] == (422, "config")
    assert post(files={"name": ("n.txt", b"t"), "file": ("r.jsonl", jsonl)})[:2] == (422, "name")
    assert post(data={"name": "t", "config": "{}"}, files={"file": ("r.jsonl", jsonl),
                                                           "config": ("c.json", b"{}")})[0] == 422
    bad_label = b'{"prompt": "p", "completion": "c", "label": {"x": 1}}\n'
    assert post(data={"name": "t"}, files={"file": ("r.jsonl", jsonl + bad_label)})[:2] == (422, "file[1].label")
    assert httpx.get(url + "/v1/jobs", headers=h).json()["jobs"] == []


def _dataset(n_bytes: int) -> list[dict]:
    rows, size, i = [], 0, 0
    while size < n_bytes:
        row = {"prompt": f"item: word{i} (f)\nclass:", "completion": " fruit", "label": "fruit"}
        rows.append(row)
        size += len(json.dumps(row)) + 2
        i += 1
    return rows


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_parsing_a_dataset_peaks_at_a_few_times_its_size(tiny_model_dir):
    """Parsing and checking a dataset, one row at a time into slotted rows, and its length check, tokenized a chunk
    at a time: under 4x the body's size (the body's text and the rows' strings). Before, json.loads of the whole
    body (a dict per row) then every row's token ids at once: 5.6x for the JSON body, 9.2x for the JSONL file
    before the length check, 19x with it (6 MB, SmolLM2's tokenizer). 2 MB here to keep the test short."""
    from transformers import AutoTokenizer

    from server.datasets import check_lengths, parse_jsonl, parse_task_json

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _dataset(2 << 20)
    body = json.dumps({"name": "big", "data": rows}).encode()
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    del rows

    def validate():
        check_lengths(parse_task_json(body, max_rows=10**6).rows, tokenizer, 512)
    peak_json = _peak(validate)
    peak_jsonl = _peak(lambda: parse_jsonl(io.BytesIO(jsonl), max_rows=10**6, max_bytes=len(jsonl)))
    print(f"peak while checking {len(body) / 2**20:.1f} MB: JSON body and length check {peak_json / 2**20:.1f} MB "
          f"({peak_json / len(body):.1f}x), JSONL file {peak_jsonl / 2**20:.1f} MB ({peak_jsonl / len(jsonl):.1f}x)")
    assert peak_json < 4 * len(body) and peak_jsonl < 4 * len(jsonl)


def test_concurrent_uploads_over_the_cap_get_429(keyed):
    url, h = keyed.url, {**auth(ADMIN), "content-type": "application/json"}
    sent, release, answers = threading.Event(), threading.Event(), []
    bad = json.dumps({"name": "slow", "data": [{"prompt": "p", "completion": 5}]}).encode()

    def slow_body():
        yield bad[:10]
        sent.set()
        release.wait(20)
        yield bad[10:]

    first = threading.Thread(target=lambda: answers.append(
        httpx.post(url + "/v1/tasks", content=slow_body(), headers=h, timeout=30)))
    first.start()
    try:
        assert sent.wait(10)
        time.sleep(0.3)
        r = httpx.post(url + "/v1/tasks", content=bad, headers=h)
        code, _, message = error(r)
        assert code == 429 and int(r.headers["retry-after"]) >= 1 and "max_concurrent_uploads" in message, r.text
        assert httpx.post(url + "/v1/generate", headers=auth(READ),  # other routes are not capped
                          json={"task": "@base", "prompt": "hi", "max_new_tokens": 1}).status_code == 200
    finally:
        release.set()
        first.join(30)
    assert error(answers[0])[:2] == (422, "data[0].completion")
    assert error(httpx.post(url + "/v1/tasks", content=bad, headers=h))[0] == 422  # the slot is free again


# --- item 2: a large upload does not stall serving -------------------------------------------------------------

def test_a_large_upload_does_not_stall_serving(keyed):
    """150,000 short rows (6 MB) parsed, checked, tokenized and written (fsync) while /readyz is polled. All of it
    runs in worker threads, one row (or 64 rows) per call, with no object per row for the garbage collector, so the
    serving thread gets the GIL back within a few switch intervals: the worst poll here about 0.15 s. Before, the
    parsing, the row checks and the job's files ran on the event loop: the worst poll took about 0.8 s."""
    url = keyed.url
    rows = [{"prompt": f"w{i}", "completion": "c"} for i in range(150_000)]
    body = json.dumps({"name": "large", "data": rows, "config": {"epochs": 1, "max_steps": 1}}).encode()
    del rows
    latencies, done, answer = [], threading.Event(), []

    def upload():
        started = time.monotonic()
        answer.append(httpx.post(url + "/v1/tasks", content=body, timeout=120,
                                 headers={"content-type": "application/json", **auth(ADMIN)}))
        answer.append(time.monotonic() - started)
        done.set()

    poster = threading.Thread(target=upload)
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/readyz")
        poster.start()
        while not done.is_set():
            started = time.monotonic()
            assert client.get("/readyz").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)
    poster.join()
    r, took = answer
    assert r.status_code == 202, r.text
    httpx.delete(f"{url}/v1/jobs/{r.json()['job_id']}", headers=auth(ADMIN))
    worst = sorted(latencies)[-3:]
    print(f"upload of {len(body) / 2**20:.1f} MB took {took:.2f} s; {len(latencies)} /readyz polls meanwhile, "
          f"worst {[round(w * 1000) for w in worst]} ms, median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms")
    assert len(latencies) >= 10, (took, len(latencies))  # the upload took long enough to show a stall
    assert worst[-1] < 0.4, worst
