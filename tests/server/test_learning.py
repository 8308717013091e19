"""Learning while serving, over HTTP on a real server with the tiny model: jobs, validation, guarantees."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

import httpx
import pytest

from support import FINAL_JOB_STATES, TOY_CONFIG, reproduce_heldout, toy_rows
from support import wait_job as _wait_job


def wait_job(server, job_id, states=FINAL_JOB_STATES):
    return _wait_job(server.url, job_id, states, log=server.log)


def learn(server, name, rows=None, config=None):
    body = {"name": name, "data": rows if rows is not None else toy_rows(), "config": config or TOY_CONFIG}
    return httpx.post(server.url + "/v1/tasks", json=body, timeout=60)


def greedy(server, task, prompt, n=8):
    r = httpx.post(server.url + "/v1/generate", json={"task": task, "prompt": prompt, "max_new_tokens": n},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def file_digests(store):
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and not p.relative_to(store).parts[0].startswith(".")}


def test_learn_a_task_while_serving_and_keep_earlier_ones_intact(tiny_model_dir, start_server, tmp_path):
    server = start_server(tiny_model_dir)
    rows = toy_rows()
    r = learn(server, "toy")
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["task"] == "toy" and accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    job = wait_job(server, accepted["job_id"])
    assert job["status"] == "succeeded", job
    m = job["metrics"]
    assert m["heldout_rows"] == 8 and m["train_rows"] == 24
    assert 0 <= m["heldout_texts_changed_by_compact"] <= 8  # the fp32 delta against the stored bf16 one
    assert m["heldout_exact_match"] >= 0.75 and m["heldout_exact_match_base"] <= 0.1, m
    assert 0 < m["density"] < 0.5  # sparse (the budget of issue 2 is pinned by tests/server/test_training.py)
    assert job["step"] == job["total_steps"] == 40 * 3
    # Served at once, answering held-out-style prompts it never saw.
    assert greedy(server, "toy", "item: walnut (f)\nclass:").strip() == "fruit"
    assert greedy(server, "toy", "item: sprout (v)\nclass:").strip() == "veg"
    info = httpx.get(server.url + "/v1/tasks/toy").json()
    assert info["metrics"]["heldout_exact_match"] == m["heldout_exact_match"] and info["order"] == 0

    # Task 2, trained on top of task 1, while a client generates without pause through training and
    # registration. Task 1's files and its isolated outputs must not change.
    store = tmp_path / "store"
    before_files = file_digests(store)
    probes = [row["prompt"] for row in rows[::5]]
    before_out = [greedy(server, "toy", p) for p in probes]
    failures, done, served = [], threading.Event(), []

    def client():
        while not done.is_set():
            try:
                r = httpx.post(server.url + "/v1/generate", timeout=60,
                               json={"task": "@stack", "prompt": "item: kiwi (f)\nclass:", "max_new_tokens": 3})
                (served if r.status_code == 200 else failures).append(r.status_code)
            except httpx.HTTPError as e:
                failures.append(repr(e))
    thread = threading.Thread(target=client)
    thread.start()
    flipped = [{"prompt": x["prompt"].replace("class:", "kind:"), "completion": x["completion"].upper()}
               for x in rows]
    job2 = wait_job(server, learn(server, "toy-upper", flipped).json()["job_id"])
    time.sleep(1.0)  # keep generating a moment after registration
    done.set()
    thread.join()
    assert job2["status"] == "succeeded", job2
    assert failures == [] and len(served) > 5
    after_files = file_digests(store)
    assert {k: v for k, v in after_files.items() if k.startswith("toy/")} == before_files
    assert [greedy(server, "toy", p) for p in probes] == before_out
    detail = httpx.get(server.url + "/v1/tasks/toy-upper").json()
    assert detail["order"] == 1 and detail["parents"] == [{"task": "toy", "sha256": info["tensors_sha256"]}]
    assert detail["route"] == ["toy", "toy-upper"]  # served with the delta it was trained on, and its own
    # The job's held-out figure is what a user gets: the same rows through /v1/generate naming the task.
    assert reproduce_heldout(server.url, "toy-upper", flipped, TOY_CONFIG) == job2["metrics"]["heldout_exact_match"]
    assert job2["metrics"]["heldout_exact_match"] >= 0.75, job2["metrics"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'jumplora_jobs{state="succeeded"} 2.0' in metrics
    assert "jumplora_register_seconds_count 2.0" in metrics


def test_validation_names_the_row_and_field(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, extra_args=["--max-dataset-rows", "40"])
    ok = toy_rows()[:4]

    def post(body):
        r = httpx.post(server.url + "/v1/tasks", json=body)
        return r.status_code, r.json()["error"]["param"], r.json()["error"]["message"]

    assert post({"name": "Bad Name", "data": ok})[:2] == (422, "name")
    assert post({"name": "@stack", "data": ok})[:2] == (422, "name")
    assert post({"name": "../x", "data": ok})[:2] == (422, "name")
    assert post({"name": "t", "data": []})[:2] == (422, "data")
    bad = ok[:2] + [{"prompt": "x", "completion": 5}]
    assert post({"name": "t", "data": bad})[:2] == (422, "data[2].completion")
    assert post({"name": "t", "data": ok + [{"prompt": "x"}]})[:2] == (422, "data[4].completion")
    assert post({"name": "t", "data": ok + [{"prompt": "x", "completion": "y", "extra": 1}]})[:2] == (
        422, "data[4].extra")
    code, param, msg = post({"name": "t", "data": ok + [{"prompt": "x" * 600, "completion": " y"}]})
    assert (code, param) == (422, "data[4]") and "max_seq_len 512" in msg
    assert post({"name": "t", "data": ok * 11})[0] == 413
    assert post({"name": "t", "data": ok, "config": {"nope": 1}})[:2] == (422, "config.nope")
    assert post({"name": "t", "data": ok, "config": {"rank": 0}})[:2] == (422, "config.rank")
    assert post({"name": "t", "data": ok, "config": {"targets": ["nope_proj"]}})[:2] == (422, "config.targets")
    # a layer the engine does not serve adapters on would be trained, stored and never applied
    code, param, msg = post({"name": "t", "data": ok, "config": {"targets": ["q_proj", "lm_head"]}})
    assert (code, param) == (422, "config.targets") and "'lm_head'" in msg
    assert post({"name": "t", "data": ok, "extra": 1})[:2] == (422, "extra")
    r = httpx.post(server.url + "/v1/tasks", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert httpx.get(server.url + "/v1/jobs").json()["jobs"] == []  # nothing was queued
    first = learn(server, "taken", ok, {"epochs": 1})
    assert first.status_code == 202
    assert post({"name": "taken", "data": ok})[:2] == (409, "name")


def test_multipart_jsonl_upload(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir)
    jsonl = "".join(json.dumps(r) + "\n" for r in toy_rows()[:6]).encode()
    r = httpx.post(server.url + "/v1/tasks", data={"name": "up", "config": json.dumps({"epochs": 1})},
                   files={"file": ("rows.jsonl", jsonl, "application/jsonl")})
    assert r.status_code == 202, r.text
    assert wait_job(server, r.json()["job_id"])["status"] == "succeeded"
    bad = jsonl + b'{"prompt": "x", "completion": 3}\n'
    r = httpx.post(server.url + "/v1/tasks", data={"name": "up2"}, files={"file": ("rows.jsonl", bad)})
    assert r.status_code == 422 and r.json()["error"]["param"] == "file[6].completion"
    r = httpx.post(server.url + "/v1/tasks", data={"name": "up3"}, files={"file": ("rows.jsonl", b"\xff\xfe{")})
    assert r.status_code == 422 and "UTF-8" in r.json()["error"]["message"]


def test_cancel_running_and_queued_jobs_registers_nothing(tiny_model_dir, start_server, tmp_path):
    server = start_server(tiny_model_dir)
    long = {**TOY_CONFIG, "epochs": 1000}
    running = learn(server, "long-one", config=long).json()["job_id"]
    queued = learn(server, "next-one", config=long).json()["job_id"]
    wait_job(server, running, states=("running",))
    assert httpx.get(f"{server.url}/v1/jobs/{queued}").json()["status"] == "queued"
    assert httpx.delete(f"{server.url}/v1/jobs/{queued}").json()["status"] == "cancelled"
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/v1/jobs/{running}").json()["step"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    httpx.delete(f"{server.url}/v1/jobs/{running}")
    assert wait_job(server, running)["status"] == "cancelled"
    assert httpx.delete(f"{server.url}/v1/jobs/{running}").status_code == 409
    assert httpx.get(server.url + "/v1/tasks").json()["tasks"] == []
    assert not (tmp_path / "store" / "long-one").exists() and not (tmp_path / "store" / "next-one").exists()


def test_restart_marks_the_running_job_interrupted_and_runs_the_queued_one(tiny_model_dir, start_server,
                                                                           tmp_path):
    server = start_server(tiny_model_dir)
    first = learn(server, "killed", config={**TOY_CONFIG, "epochs": 1000}).json()["job_id"]
    second = learn(server, "after", config={**TOY_CONFIG, "epochs": 2}).json()["job_id"]
    wait_job(server, first, states=("running",))
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    again = start_server(tiny_model_dir)
    job = httpx.get(f"{again.url}/v1/jobs/{first}").json()
    assert job["status"] == "failed" and job["error"] == "interrupted"
    assert wait_job(again, second)["status"] == "succeeded"
    assert [t["name"] for t in httpx.get(again.url + "/v1/tasks").json()["tasks"]] == ["after"]
    assert not (tmp_path / "store" / "killed").exists()


def test_parents_routes_deletion_order_and_max_tasks(tiny_model_dir, start_server):
    """``config.parent``: @stack (default), @base, or a task (a branch); each task is served with its route; a
    task in another's route cannot be deleted first; ``max_tasks`` refuses one more with 507."""
    server = start_server(tiny_model_dir, extra_args=["--max-tasks", "3"])
    quick = {**TOY_CONFIG, "epochs": 2}

    def run(name, parent=None):
        r = learn(server, name, config={**quick, **({"parent": parent} if parent else {})})
        assert r.status_code == 202, r.text
        assert wait_job(server, r.json()["job_id"])["status"] == "succeeded"
        return httpx.get(f"{server.url}/v1/tasks/{name}").json()

    def error(r):
        return r.status_code, r.json()["error"]["param"]

    assert error(learn(server, "x", config={"parent": "@nope"})) == (422, "config.parent")
    assert error(learn(server, "x", config={"parent": "missing"})) == (404, "config.parent")
    a = run("a")
    b = run("b", "@base")
    c = run("c", "a")
    assert [a["route"], b["route"], c["route"]] == [["a"], ["b"], ["a", "c"]]
    assert b["parents"] == [] and [p["task"] for p in c["parents"]] == ["a"]
    assert error(learn(server, "d", config=quick)) == (507, "name")  # max_tasks=3
    r = httpx.delete(server.url + "/v1/tasks/a")
    assert error(r) == (409, "name") and "(c)" in r.json()["error"]["message"]
    before = greedy(server, "c", "item: kiwi (f)\nclass:")
    assert httpx.delete(server.url + "/v1/tasks/b").status_code == 200  # nobody's parent: @stack changes only
    assert greedy(server, "c", "item: kiwi (f)\nclass:") == before
    assert httpx.delete(server.url + "/v1/tasks/c").status_code == 200
    assert httpx.delete(server.url + "/v1/tasks/a").status_code == 200
    assert httpx.get(server.url + "/v1/tasks").json()["tasks"] == []
