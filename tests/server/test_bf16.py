"""bfloat16, the dtype the server uses on CUDA, run on this CPU: the engine serves in bf16 and the training worker
trains in bf16, and a task's held-out figure is still what a generate naming it gives."""
from __future__ import annotations

import httpx

from support import TOY_CONFIG, reproduce_heldout, toy_rows, wait_job


def test_learning_and_serving_in_bfloat16(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, extra_args=["--dtype", "bfloat16"])
    config = {**TOY_CONFIG, "epochs": 20}
    r = httpx.post(server.url + "/v1/tasks", json={"name": "toy", "data": toy_rows(), "config": config}, timeout=60)
    assert r.status_code == 202, r.text
    job = wait_job(server.url, r.json()["job_id"], log=server.log)
    assert job["status"] == "succeeded", job
    m = job["metrics"]
    assert m["heldout_exact_match"] > m["heldout_exact_match_base"], m  # it learned, in bf16
    assert reproduce_heldout(server.url, "toy", toy_rows(), config) == m["heldout_exact_match"]
