"""A real Prometheus (the Debian package) scraping a real server with the project's scrape config."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.loopback import free_port
from support import TOY_CONFIG, toy_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    assert path, "this test needs the Prometheus binary: apt-get install -y prometheus (.ci/run does)"
    return path


def query(url: str, expr: str) -> list:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_prometheus_scrapes_latency_and_adapter_density(tiny_model_dir, start_server, tmp_path):
    binary = prometheus_binary()
    server = start_server(tiny_model_dir)
    job = httpx.post(server.url + "/v1/tasks", json={"name": "toy", "data": toy_rows(), "config": TOY_CONFIG}).json()
    deadline = time.monotonic() + 180
    while httpx.get(f"{server.url}/v1/jobs/{job['job_id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    # The project's scrape config, with the Compose service discovery replaced by this server's address.
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    scrape = config["scrape_configs"][0]
    assert scrape["job_name"] == "jumplora" and scrape["metrics_path"] == "/metrics"
    del scrape["dns_sd_configs"]
    scrape["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
    scrape["scrape_interval"] = config["global"]["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # Prometheus is up and has scraped the server once
            try:
                ready = httpx.get(url + "/-/ready", timeout=10).status_code == 200  # 503 while it starts
                if ready and query(url, 'up{job="jumplora"} == 1'):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        for i in range(40):  # traffic on two routes, over a few scrapes
            httpx.post(server.url + "/v1/generate", json={"task": "toy" if i % 2 else "@base",
                                                          "prompt": f"item: x{i} (f)\nclass:", "max_new_tokens": 6})
            time.sleep(0.1)
        deadline = time.monotonic() + 60
        p90 = density = []
        while time.monotonic() < deadline:
            try:
                p90 = query(url, 'histogram_quantile(0.9, sum by (le) '
                                 '(rate(jumplora_request_duration_seconds_bucket{task="toy"}[1m])))')
                density = query(url, 'jumplora_adapter_density{task="toy"}')
            except httpx.HTTPError:
                pass
            if p90 and density and p90[0]["value"][1] not in ("NaN", "0"):
                break
            time.sleep(1)
        assert p90 and 0 < float(p90[0]["value"][1]) < 60, p90
        local = httpx.get(f"{server.url}/v1/tasks/toy").json()["density"]
        assert density and float(density[0]["value"][1]) == pytest.approx(local)
    finally:
        prom.terminate()
        prom.wait(timeout=20)
