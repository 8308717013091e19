"""API keys, limits with their own error codes, hostile datasets, and task deletion."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from support import TOY_CONFIG, toy_rows

READ, ADMIN = "read-key-123", "admin-key-456"


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    from benchmarks.loopback import ServerProcess

    root = tmp_path_factory.mktemp("keyed")
    server = ServerProcess(tiny_model_dir, root / "store", root / "cache",
                           env={"JUMPLORA_API_KEY": READ, "JUMPLORA_ADMIN_KEY": ADMIN},
                           extra_args=["--max-body-bytes", "4096", "--max-prompt-tokens", "64",
                                       "--max-new-tokens-limit", "100", "--max-streams", "1",
                                       "--max-dataset-rows", "50",
                                       "--max-dataset-bytes", "20000"]).wait_ready()
    yield server
    server.stop()


def test_keys_read_and_admin(keyed):
    url = keyed.url
    body = {"task": "@base", "prompt": "hi", "max_new_tokens": 2}
    assert httpx.get(url + "/healthz").status_code == 200  # open
    assert httpx.get(url + "/readyz").status_code == 200  # open
    assert httpx.get(url + "/metrics").status_code == 200  # open by default (metrics_auth off)
    r = httpx.post(url + "/v1/generate", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url + "/v1/generate", json=body, headers=auth("wrong")).status_code == 401
    assert httpx.post(url + "/v1/generate", json=body, headers=auth(READ)).status_code == 200
    assert httpx.post(url + "/v1/generate", json=body, headers=auth(ADMIN)).status_code == 200
    assert httpx.get(url + "/v1/tasks", headers=auth(READ)).status_code == 200
    assert httpx.get(url + "/v1/jobs").status_code == 401
    learn = {"name": "x", "data": toy_rows()[:4]}
    r = httpx.post(url + "/v1/tasks", json=learn, headers=auth(READ))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.delete(url + "/v1/tasks/x", headers=auth(READ)).status_code == 403
    assert httpx.delete(url + "/v1/jobs/nope", headers=auth(READ)).status_code == 403
    assert httpx.get(url + "/v1/export/@base", headers=auth(READ)).status_code == 403
    assert httpx.delete(url + "/v1/jobs/nope", headers=auth(ADMIN)).status_code == 404
    # Keys never reach the log.
    assert READ not in keyed.log() and ADMIN not in keyed.log()


def test_each_limit_has_its_own_code(keyed):
    url, h = keyed.url, auth(ADMIN)
    r = httpx.post(url + "/v1/generate", headers=h, content=json.dumps({"prompt": "x" * 5000}),
                   )
    assert r.status_code == 413  # body
    r = httpx.post(url + "/v1/generate", headers=h, json={"prompt": "word " * 100, "max_new_tokens": 2})
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"  # prompt tokens
    r = httpx.post(url + "/v1/generate", headers=h, json={"prompt": "x", "max_new_tokens": 101})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_new_tokens"
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "@base", "prompt": "x", "max_tokens": 101})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    # one stream at a time: of four streams started together, the ones that find another open get 429
    import concurrent.futures as cf

    def stream(i):
        return httpx.post(url + "/v1/generate", headers=h, timeout=30,
                          json={"prompt": f"s{i}", "max_new_tokens": 100, "ignore_eos": True, "stream": True})
    with cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(stream, range(4)))
    codes = sorted(a.status_code for a in answers)
    assert codes[0] == 200 and 429 in codes and set(codes) <= {200, 429}, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and "streams" in refused.json()["error"]["message"]
    r = httpx.post(url + "/v1/tasks", headers=h, json={"name": "big", "data": toy_rows() * 2})
    assert r.status_code == 413  # rows (50 allowed)
    r = httpx.post(url + "/v1/tasks", headers=h, json={"name": "big", "data": [{"prompt": "p" * 30000,
                                                                               "completion": "c"}]})
    assert r.status_code == 413  # dataset bytes


HOSTILE = [
    ("wrong encoding", b'{"prompt": "caf\xe9", "completion": "x"}\n', 422, "UTF-8"),
    ("NUL byte", b'{"prompt": "a\\u0000b", "completion": "x"}\n', 422, "NUL"),
    ("deep nesting", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "completion": "x"}\n', 422, "line 1"),
    ("non-string field", b'{"prompt": 5, "completion": "x"}\n', 422, "file[0].prompt"),
    ("huge line", b'{"prompt": "' + b"y" * 30000 + b'", "completion": "x"}\n', 413, "bytes"),
    ("not an object", b'["prompt", "completion"]\n', 422, "file[0]"),
]


@pytest.mark.parametrize("label,data,code,needle", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_uploads_are_refused_and_nothing_is_written(keyed, tmp_path, label, data, code, needle):
    r = httpx.post(keyed.url + "/v1/tasks", headers=auth(ADMIN), data={"name": "hostile"},
                   files={"file": ("rows.jsonl", data)})
    assert r.status_code == code, (label, r.text)
    assert needle in r.json()["error"]["message"] + str(r.json()["error"]["param"])
    assert httpx.get(keyed.url + "/v1/jobs", headers=auth(ADMIN)).json()["jobs"] == []


@pytest.mark.parametrize("name", ["../evil", "@stack", "a/b", "UPPER", ".hidden", "x" * 65])
def test_hostile_names_are_refused(keyed, name):
    r = httpx.post(keyed.url + "/v1/tasks", headers=auth(ADMIN), json={"name": name, "data": toy_rows()[:2]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "name"


def test_delete_task_moves_it_to_the_trash(tiny_model_dir, start_server, tmp_path):
    """Deleting a task that no other task's route holds ("second" trained on the base alone; the refusal of a
    parent's deletion is tests/server/test_learning.py's)."""
    server = start_server(tiny_model_dir)

    def learn(name):
        job = httpx.post(server.url + "/v1/tasks", json={"name": name, "data": toy_rows(),
                                                         "config": {**TOY_CONFIG, "epochs": 3, "parent": "@base"}}).json()
        deadline = time.monotonic() + 120
        while httpx.get(f"{server.url}/v1/jobs/{job['job_id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    learn("first")
    learn("second")
    stack_before = httpx.post(server.url + "/v1/generate", json={"task": "@stack", "prompt": "item: a (f)\nclass:",
                                                                 "max_new_tokens": 8}).json()["text"]
    r = httpx.delete(server.url + "/v1/tasks/first")
    assert r.status_code == 200
    trash = r.json()["trash"]
    assert "/.trash/first-" in trash and (tmp_path / "store" / ".trash").is_dir()
    assert not (tmp_path / "store" / "first").exists()
    tasks = httpx.get(server.url + "/v1/tasks").json()["tasks"]
    assert [t["name"] for t in tasks] == ["second"] and tasks[0]["trained_on_deleted"] == []
    assert httpx.post(server.url + "/v1/generate", json={"task": "first", "prompt": "x"}).status_code == 404
    stack_after = httpx.post(server.url + "/v1/generate", json={"task": "@stack", "prompt": "item: a (f)\nclass:",
                                                                "max_new_tokens": 8}).json()["text"]
    second = httpx.post(server.url + "/v1/generate", json={"task": "second", "prompt": "item: a (f)\nclass:",
                                                           "max_new_tokens": 8}).json()["text"]
    assert stack_after == second  # the stack is the remaining task alone now
    assert httpx.delete(server.url + "/v1/tasks/first").status_code == 404
    assert 'jumplora_adapter_density{task="first"}' not in httpx.get(server.url + "/metrics").text
    assert stack_before != stack_after or stack_before == second


def test_request_timeout_is_504_and_frees_the_row(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, extra_args=["--request-timeout-s", "0.05"])
    r = httpx.post(server.url + "/v1/generate", timeout=30,
                   json={"prompt": "go on", "max_new_tokens": 400, "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    deadline = time.monotonic() + 5
    while "jumplora_running_batch_size 0.0" not in httpx.get(server.url + "/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
