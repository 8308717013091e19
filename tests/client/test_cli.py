"""The ``jumplora`` command without a real server: help, usage errors, parsing, the hand-over commands, and a
failed job against a fake server (test_live.py runs it against a real one)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client import cli as cli_module

COMMANDS = ["generate", "learn", "tasks", "jobs", "cancel", "delete", "models", "health", "export", "bench"]


def test_help_on_every_command(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli_module.main([command, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: jumplora {command}"), (command, out)
        if command not in ("bench",):
            assert "--url" in out, command
    with pytest.raises(SystemExit) as e:
        cli_module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(c in out for c in COMMANDS + ["serve", "eval"])


def test_the_console_script_runs():
    script = Path(sys.executable).with_name("jumplora")
    p = subprocess.run([str(script), "tasks", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--json" in p.stdout


def test_usage_and_connection_errors_exit_without_traceback(cli):
    code, out, err = cli("generate")  # PROMPT missing
    assert code == 2 and "required: PROMPT" in err
    code, out, err = cli("frobnicate")
    assert code == 2 and "invalid choice" in err
    code, out, err = cli("tasks", "--url", "http://127.0.0.1:9")
    assert code == 1 and err.startswith("jumplora: cannot connect") and "http://127.0.0.1:9" in err
    assert "Traceback" not in err


def test_handover_commands_exec_the_right_module(monkeypatch):
    calls = []

    class Execd(Exception):
        pass

    def fake_execv(path, argv):
        calls.append(argv)
        raise Execd()

    monkeypatch.setattr(os, "execv", fake_execv)
    cases = [
        (["serve", "--port", "9000"], ["server", "serve", "--port", "9000"]),
        (["serve", "--help"], ["server", "serve", "--help"]),
        (["eval", "--tasks", "a,b"], ["benchmarks.cl", "--tasks", "a,b"]),
        (["bench", "serve", "--requests", "8"], ["benchmarks.serving", "--requests", "8"]),
        (["bench", "learn"], ["benchmarks.learning"]),
        (["export", "@stack", "out", "--store", "S", "--model", "M"],
         ["server.export", "--store", "S", "--model", "M", "@stack", "out"]),
        (["export", "toy", "out", "--store", "S"], ["server.export", "--store", "S", "toy", "out"]),
    ]
    for argv, expected in cases:
        with pytest.raises(Execd):
            cli_module.main(argv)
        assert calls[-1] == [sys.executable, "-m", *expected], argv
    assert cli_module.main(["export", "toy", "out", "--store", "S", "--url", "http://x"]) == 2
    assert cli_module.main(["export", "toy", "out", "--model", "M"]) == 2
    assert len(calls) == len(cases)


def test_learn_sends_only_the_options_given():
    parse = cli_module.build_parser().parse_args
    args = parse(["learn", "t", "f.jsonl", "--epochs", "2", "--targets", "q_proj, k_proj", "--learning-rate", "0.01"])
    assert cli_module.learn_config(args) == {"epochs": 2, "targets": ["q_proj", "k_proj"], "learning_rate": 0.01}
    args = parse(["learn", "t", "f.jsonl", "--config", '{"rank": 4, "epochs": 9}', "--epochs", "3"])
    assert cli_module.learn_config(args) == {"rank": 4, "epochs": 3}
    assert cli_module.learn_config(parse(["learn", "t", "f.jsonl"])) == {}


def _job(status: str, step: int, error: str | None = None) -> dict:
    return {"id": "job-1", "task": "doomed", "status": status, "created_at": "2026-01-01T00:00:00Z", "step": step,
            "total_steps": 10, "loss": 1.5 - step / 10, "density": 0.01, "eta_s": 12.0, "error": error,
            "n_rows": 4, "config": {}, "metrics": {}}


def test_learn_wait_exits_1_when_the_job_fails(fake, cli, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    fake.routes[("POST", "/v1/tasks")] = (202, {"job_id": "job-1", "task": "doomed", "status": "queued",
                                                "status_url": "/v1/jobs/job-1"}, {})
    fake.routes[("GET", "/v1/jobs/job-1")] = [(200, _job("queued", 0), {}), (200, _job("running", 4), {}),
                                              (200, _job("failed", 4, "worker exited with 1: boom"), {})]
    code, out, err = cli("learn", "doomed", str(path), "--epochs", "3", "--wait", "--poll", "0.05",
                         "--url", fake.url)
    assert code == 1 and out.strip() == "job-1"
    assert "job-1 doomed running  [#########" in err and "4/10" in err and "eta 0:12" in err
    assert err.splitlines()[-1] == "jumplora: job job-1 (doomed) failed: worker exited with 1: boom"
    method, path_, headers, body = next(r for r in fake.requests if r[0] == "POST")
    assert headers["content-type"].startswith("multipart/form-data") and b'{"epochs": 3}' in body


def test_progress_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    from client.api import Job

    term = Terminal()
    progress = cli_module.Progress(term)
    progress(Job(id="job-1", task="t", status="running", step=5, total_steps=10, loss=0.5, density=0.02, eta_s=75))
    progress(Job(id="job-1", task="t", status="succeeded", step=10, total_steps=10, loss=0.25, density=0.02))
    progress.end()
    first, second = term.getvalue().split("\r")[1:]
    assert first.startswith("job-1 t running  [############............] 5/10  loss 0.5000  density 0.0200")
    assert first.endswith("eta 1:15") and "\n" not in first
    assert second.startswith("job-1 t succeeded  [########################] 10/10") and second.endswith("\n")
    assert len(second.rstrip("\n")) == len(first)  # padded over the longer previous line
