"""Several server processes on one store, and the merged export."""
from __future__ import annotations

import io
import json
import tarfile
import time

import httpx
import torch

from support import TOY_CONFIG, toy_rows, wait_job


def generate(url, task, prompt, n=8):
    r = httpx.post(url + "/v1/generate", json={"task": task, "prompt": prompt, "max_new_tokens": n}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_two_replicas_share_one_store(tiny_model_dir, start_server, tmp_path):
    store = tmp_path / "shared-store"
    a = start_server(tiny_model_dir, store=store, extra_args=["--store-poll-seconds", "0.5"])
    b = start_server(tiny_model_dir, store=store, extra_args=["--store-poll-seconds", "0.5"])
    # Learn through B (which does not hold the trainer lock: A started first); A trains it.
    r = httpx.post(b.url + "/v1/tasks", json={"name": "shared", "data": toy_rows(), "config": TOY_CONFIG})
    assert r.status_code == 202, r.text
    job = wait_job(b.url, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    # Both serve it within a few seconds, with the same outputs.
    deadline = time.monotonic() + 10
    while not all(any(t["name"] == "shared" for t in httpx.get(s.url + "/v1/tasks").json()["tasks"]) for s in (a, b)):
        assert time.monotonic() < deadline, "a replica did not pick the adapter up"
        time.sleep(0.2)
    prompt = "item: walnut (f)\nclass:"
    assert generate(a.url, "shared", prompt) == generate(b.url, "shared", prompt)
    # The same name cannot be taken through the other replica; job records are shared.
    assert httpx.post(a.url + "/v1/tasks", json={"name": "shared", "data": toy_rows()}).status_code == 409
    assert [j["id"] for j in httpx.get(a.url + "/v1/jobs").json()["jobs"]] == [job["id"]]
    # Only one trains: when the trainer dies, the other takes over the queue.
    long = httpx.post(b.url + "/v1/tasks", json={"name": "long", "data": toy_rows(),
                                                  "config": {**TOY_CONFIG, "epochs": 1000}}).json()["job_id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{b.url}/v1/jobs/{long}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    nxt = httpx.post(b.url + "/v1/tasks", json={"name": "next", "data": toy_rows()[:8],
                                                 "config": {"epochs": 2}}).json()["job_id"]
    a.proc.kill()
    a.proc.wait()
    assert wait_job(b.url, long)["error"] == "interrupted"
    assert wait_job(b.url, nxt)["status"] == "succeeded"


def test_export_matches_the_server(tiny_model_dir, start_server, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server = start_server(tiny_model_dir)
    job = httpx.post(server.url + "/v1/tasks", json={"name": "toy", "data": toy_rows(), "config": TOY_CONFIG}).json()
    assert wait_job(server.url, job["job_id"])["status"] == "succeeded"
    for name in ("toy", "@stack"):
        r = httpx.get(f"{server.url}/v1/export/{name}", timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        out = tmp_path / f"export-{name.strip('@')}"
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            tar.extractall(out, filter="data")
        assert json.loads((out / "jumplora-export.json").read_text())["merged"][0]["task"] == "toy"
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
        for prompt in ("item: walnut (f)\nclass:", "item: sprout (v)\nclass:", "hello"):
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            assert text == generate(server.url, name, prompt), (name, prompt)
    assert httpx.get(f"{server.url}/v1/export/nope").status_code == 404


def test_export_from_the_store_on_the_command_line(tiny_model_dir, tiny_base, tmp_path):
    import subprocess
    import sys

    from adapters_store import AdapterStore
    from server.model import merged_deltas
    from support import put_task, served_deltas, task_deltas

    store = AdapterStore(tmp_path / "store")
    deltas = task_deltas(tiny_base.model, 0.05, seed=4)
    put_task(store, "t", deltas, tiny_base.fingerprint, 0)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "server.export", "--store", str(store.root), "--model",
                           str(tiny_model_dir), "t", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(out)
    with merged_deltas(tiny_base.model, served_deltas(store, "t")):  # as stored (compact) and served
        for name, param in tiny_base.model.state_dict().items():
            assert torch.allclose(exported.state_dict()[name], param, atol=1e-7), name
    again = subprocess.run([sys.executable, "-m", "server.export", "--store", str(store.root), "--model",
                            str(tiny_model_dir), "t", str(out)], capture_output=True, text=True)
    assert again.returncode == 1 and "not empty" in again.stderr
    # a task trained on "t" is exported with its route, as it is served: both deltas
    put_task(store, "u", task_deltas(tiny_base.model, 0.05, seed=5), tiny_base.fingerprint, 1, parents=["t"])
    done = subprocess.run([sys.executable, "-m", "server.export", "--store", str(store.root), "--model",
                           str(tiny_model_dir), "u", str(tmp_path / "out-u")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out-u")
    t, u = served_deltas(store, "t"), served_deltas(store, "u")
    with merged_deltas(tiny_base.model, {k: t[k] + u[k] for k in t}):
        for name, param in tiny_base.model.state_dict().items():
            assert torch.allclose(exported.state_dict()[name], param, atol=1e-6), name
