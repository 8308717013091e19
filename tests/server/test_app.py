"""A real server process on loopback, with the tiny model."""
from __future__ import annotations

import httpx


def test_health_ready_and_generate_on_base(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir)
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    r = httpx.post(server.url + "/v1/generate", json={"task": "@base", "prompt": "hello", "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["task"] == "@base" and isinstance(r.json()["text"], str)


def test_readyz_is_503_while_the_model_is_missing(tmp_path, start_server):
    server = start_server(tmp_path / "no-such-model", wait=False)
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            r = httpx.get(server.url + "/readyz", timeout=2)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
    assert r.status_code == 503
    assert httpx.get(server.url + "/healthz").status_code == 200
    g = httpx.post(server.url + "/v1/generate", json={"prompt": "x"})
    assert g.status_code == 503 and g.json()["error"]["type"] == "not_ready_error"


def test_invalid_field_is_422_naming_it(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir)
    r = httpx.post(server.url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 0})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "max_new_tokens"


def test_a_store_write_failure_maps_to_507_in_the_one_error_place():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from adapters_store import StoreWriteError
    from server.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.delete("/x")
    def _fails():
        raise StoreWriteError("t1", "cannot move to the trash: read-only file system")

    r = TestClient(app).delete("/x")
    assert r.status_code == 507
    assert r.json()["error"]["type"] == "storage_error" and "read-only" in r.json()["error"]["message"]


def test_the_sparse_kernel_is_built_at_start_or_left_out_with_the_reason(tiny_model_dir, start_server, tmp_path):
    """On CPU the server compiles the sparse-delta kernel into its cache folder; turned off, or without a compiler,
    it serves through torch's sparse products and says so in its log."""
    built = start_server(tiny_model_dir)
    assert "sparse-delta CPU kernel: " in built.log()
    assert len(list((tmp_path / "cache" / "kernels").glob("sparse_delta-*.so"))) == 1
    off = start_server(tiny_model_dir, store=tmp_path / "store-off", extra_args=["--sparse-kernel", "false"])
    no_cc = start_server(tiny_model_dir, store=tmp_path / "store-no-cc", env={"CC": "no-such-compiler"})
    for server in (off, no_cc):
        r = httpx.post(server.url + "/v1/generate", json={"task": "@base", "prompt": "hi", "max_new_tokens": 3})
        assert r.status_code == 200, r.text
        assert "sparse-delta CPU kernel: " not in server.log()
    assert "sparse-delta CPU kernel unavailable (no C compiler: 'no-such-compiler' not found)" in no_cc.log()
