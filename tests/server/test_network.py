"""What faces the network: the refusal to serve open on a non-loopback address (and the container and Compose
set-ups that rely on it), uvicorn's request-head deadline and connection limit, the write deadline of streams,
and the settings documented in the README."""
from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_a_network_address_without_an_admin_key_is_refused():
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.com"):
        with pytest.raises(ValidationError, match="admin_key"):
            Settings(host=host)
        assert Settings(host=host, admin_key="k").host == host
        assert Settings(host=host, insecure=True).insecure
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert Settings(host=host).host == host
    with pytest.raises(ValidationError, match="admin_key"):  # an empty key is no key
        Settings(host="0.0.0.0", admin_key="  ")


def dockerfile_env() -> dict[str, str]:
    """The ``ENV`` settings of the Dockerfile (``KEY=value`` pairs, continued lines joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_compose_requires_the_admin_key_from_the_environment():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["server"]["environment"]
    assert re.fullmatch(r"\$\{JUMPLORA_ADMIN_KEY:\?[^}]+\}", env["JUMPLORA_ADMIN_KEY"])
    # the image binds every interface, so without the key it would refuse to start (next test)
    assert dockerfile_env()["JUMPLORA_HOST"] == "0.0.0.0"


def test_the_container_command_starts_only_with_an_admin_key(tiny_model_dir, start_server, tmp_path):
    """The image's environment (host 0.0.0.0) and command: refused without a key, naming the setting; with
    ``JUMPLORA_ADMIN_KEY`` it serves, and learning needs the key."""
    env = {"JUMPLORA_HOST": dockerfile_env()["JUMPLORA_HOST"]}
    with pytest.raises(RuntimeError, match=r"exited with 2[\s\S]*admin_key"):
        start_server(tiny_model_dir, env=env)
    server = start_server(tiny_model_dir, env={**env, "JUMPLORA_ADMIN_KEY": "s3cret"})
    rows = [{"prompt": "a", "completion": " b"}]
    assert httpx.post(server.url + "/v1/tasks", json={"name": "t", "data": rows}).status_code == 401
    r = httpx.post(server.url + "/v1/tasks", json={"name": "t", "data": rows, "config": {"epochs": 1}},
                   headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 202, r.text


def test_request_head_deadline_and_connection_limit(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, extra_args=["--header-timeout-s", "1", "--max-connections", "3"])
    port = server.port
    # a client that sends part of a request head and then nothing is disconnected
    with socket.create_connection(("127.0.0.1", port), timeout=6) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert s.recv(100) == b""  # closed by the server (a timeout here would raise)
        assert 0.8 < time.monotonic() - started < 4
    # so is one that connects and sends nothing; one that sends a whole request is answered
    with socket.create_connection(("127.0.0.1", port), timeout=6) as s:
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=6) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    # beyond max_connections open connections, 503
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        assert httpx.get(server.url + "/healthz").status_code == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_stream_whose_client_stops_reading_is_closed_at_the_write_deadline():
    """The client stays connected but takes no more data (its writes never complete): the response ends at
    the deadline and the event generator is closed (its ``finally`` frees the stream slot and the row)."""
    from server.api.streaming import DeadlineStreamingResponse

    closed = []

    async def events():
        try:
            while True:
                yield b"data: {}\n\n"
                await asyncio.sleep(0)
        finally:
            closed.append(time.monotonic())

    async def main():
        writes = 0

        async def send(message):
            nonlocal writes
            if message["type"] == "http.response.body":
                writes += 1
                if writes > 3:
                    await asyncio.Event().wait()  # the client's window is full, for ever

        async def receive():
            await asyncio.Event().wait()  # and it never disconnects
        response = DeadlineStreamingResponse(events(), write_timeout=0.3, media_type="text/event-stream")
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "GET", "path": "/"}
        started = time.monotonic()
        await asyncio.wait_for(response(scope, receive, send), 5)
        return started
    started = asyncio.run(main())
    assert closed and 0.25 < closed[0] - started < 2


def test_the_served_projections_are_the_runners_groups():
    from server.runner import GATE_UP, O, QKV, DOWN
    from server.schemas import SERVED_PROJECTIONS

    assert set(SERVED_PROJECTIONS) == set(QKV + O + GATE_UP + DOWN)


def test_the_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `JUMPLORA_(\w+)` \| `--([\w-]+)` \|", readme, flags=re.M))
    expected = {(name.upper(), name.replace("_", "-")) for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from the README's configuration table"
    assert documented - expected == set(), "settings in the README that do not exist"


def test_the_cuda_variant_builds_torch_from_pypi_and_asks_for_the_gpu():
    """docker-compose.cuda.yml: an empty TORCH_INDEX (the Makefile then installs PyPI's torch, the CUDA build),
    device cuda, and a GPU reservation; the Makefile's install command for that argument."""
    import subprocess

    cuda = yaml.safe_load((ROOT / "docker-compose.cuda.yml").read_text())["services"]["server"]
    assert cuda["build"]["args"]["TORCH_INDEX"] == "" and cuda["environment"]["JUMPLORA_DEVICE"] == "cuda"
    device = cuda["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert re.search(r"^ARG TORCH_INDEX=", (ROOT / "Dockerfile").read_text(), flags=re.M)

    def install_lines(*args):
        dry = subprocess.run(["make", "-n", "-B", "setup", "VENV=/nonexistent-venv", *args], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [line for line in dry.splitlines() if "install" in line and "torch==2.13.0" in line]
    assert install_lines("TORCH_INDEX=") and all("--index-url" not in line for line in install_lines("TORCH_INDEX="))
    cpu = install_lines("TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert cpu and all("--index-url https://download.pytorch.org/whl/cpu" in line for line in cpu)
