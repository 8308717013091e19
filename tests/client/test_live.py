"""The Python client and the ``jumplora`` command against one real server on loopback (the tiny model, with
tasks ``alpha`` and ``beta`` in its store; the tests that learn add tasks to it)."""
from __future__ import annotations

import asyncio
import json

import pytest

from adapters_store import AdapterStore
from benchmarks.loopback import ServerProcess
from client import AsyncClient, Client, ConflictError, InvalidRequestError, JumploraError, NotFoundError
from support import TOY_CONFIG, put_task, task_deltas, toy_rows

FAST_CONFIG = {**TOY_CONFIG, "epochs": 2}  # 24 training rows in batches of 8: 6 steps
LONG_CONFIG = {**TOY_CONFIG, "epochs": 1000}


@pytest.fixture(scope="module")
def served(tiny_model_dir, tiny_base, tmp_path_factory):
    """A real server over a store that holds two sparse tasks, ``alpha`` (order 0) and ``beta`` (order 1)."""
    root = tmp_path_factory.mktemp("client-live")
    store = AdapterStore(root / "store")
    for order, name in enumerate(["alpha", "beta"]):
        put_task(store, name, task_deltas(tiny_base.model, 0.03, seed=30 + order), tiny_base.fingerprint, order)
    server = ServerProcess(tiny_model_dir, root / "store", root / "cache").wait_ready()
    yield server
    server.stop()


@pytest.fixture
def client(served):
    with Client(served.url, timeout=60) as c:
        yield c


def test_generate_and_stream_give_the_same_text(client):
    g = client.generate("alpha", "hello there", max_new_tokens=12)
    assert g.task == "alpha" and g.finish_reason in ("length", "eos") and g.text
    assert 0 < g.usage["completion_tokens"] <= 12 and g.usage["prompt_tokens"] > 0
    stream = client.stream("alpha", "hello there", max_new_tokens=12)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == g.text
    assert stream.text == g.text and stream.finish_reason == g.finish_reason and stream.usage == g.usage
    assert client.generate("beta", "hello there", max_new_tokens=12).text != g.text  # the task is routed

    # A stop string inside the text: the final event's held-back `delta` must be yielded too.
    stop = g.text[3:5]
    stopped = client.generate("alpha", "hello there", max_new_tokens=12, stop=[stop])
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert "".join(client.stream("alpha", "hello there", max_new_tokens=12, stop=[stop])) == stopped.text


def test_complete_models_tasks_and_health(client):
    body = client.complete("@stack", "hello", max_tokens=5, temperature=0)
    assert body["object"] == "text_completion" and body["model"] == "@stack"
    assert isinstance(body["choices"][0]["text"], str) and body["usage"]["completion_tokens"] <= 5
    models = client.models()
    assert models[:2] == ["@base", "@stack"] and {"alpha", "beta"} <= set(models)
    tasks = {t.name: t for t in client.tasks()}
    assert tasks["alpha"].order == 0 and tasks["beta"].order == 1
    assert 0 < tasks["alpha"].density < 0.1 and tasks["alpha"].nonzero_params > 0
    beta = client.task("beta")
    assert beta.name == "beta" and beta.targets == ["q_proj", "v_proj"] and beta.raw["tensors_sha256"]
    health = client.health()
    assert health["live"] and health["ready"] and health["healthz"] == {"status": "ok"}
    assert health["readyz"]["status"] == "ready" and health["readyz"]["tasks"] >= 2


def test_server_errors_become_typed_exceptions(client):
    with pytest.raises(NotFoundError) as e:
        client.generate("nope", "hi")
    assert e.value.status == 404 and e.value.param == "task" and "'nope'" in e.value.message
    assert e.value.type == "not_found_error" and isinstance(e.value, JumploraError)
    with pytest.raises(NotFoundError):
        list(client.stream("nope", "hi"))
    with pytest.raises(NotFoundError) as e:
        client.task("nope")
    assert e.value.param == "name"
    with pytest.raises(NotFoundError) as e:
        client.job("job-nope")
    assert e.value.param == "job_id"
    with pytest.raises(InvalidRequestError) as e:
        client.generate("alpha", "hi", temperature=-1)
    assert e.value.status == 422 and e.value.param == "temperature"
    with pytest.raises(InvalidRequestError) as e:
        client.learn("fresh", toy_rows()[:4], config={"rank": 0})
    assert e.value.param == "config.rank" and "config.rank" in str(e.value)
    with pytest.raises(ConflictError) as e:
        client.learn("alpha", toy_rows()[:4])
    assert e.value.status == 409 and e.value.param == "name" and "alpha" in e.value.message


def test_learn_from_rows_and_from_a_jsonl_file_then_wait(client, tmp_path):
    rows = toy_rows()
    first = client.learn("toy-rows", rows, config=FAST_CONFIG)
    assert first.id.startswith("job-") and first.task == "toy-rows" and first.status in ("queued", "running")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:6] + rows[-6:]))
    second = client.learn("toy-file", path, config=FAST_CONFIG)  # a multipart upload
    assert second.id != first.id

    seen = []
    final = first.wait(poll=0.2, timeout=120, on_progress=lambda j: seen.append((j.status, j.step)))
    assert final is first and final.status == "succeeded", final.error
    assert final.step == final.total_steps == 6 and final.n_rows == 32
    assert 0 <= final.metrics["heldout_exact_match"] <= 1 and final.metrics["train_rows"] == 24
    assert seen[-1] == ("succeeded", 6) and len(seen) >= 2
    assert [s for _, s in seen] == sorted(s for _, s in seen)  # progress only moves forward

    done = second.wait(poll=0.2, timeout=120)
    assert done.status == "succeeded" and done.n_rows == 12 and done.config["epochs"] == 2
    assert client.task("toy-file").order > client.task("toy-rows").order
    assert client.generate("toy-rows", "item: kiwi (f)\nclass:", max_new_tokens=2).task == "toy-rows"
    jobs = {j.id: j for j in client.jobs()}
    assert jobs[first.id].status == jobs[second.id].status == "succeeded"

    assert client.delete_task("toy-file")["name"] == "toy-file"
    assert "toy-file" not in client.models() and "toy-rows" in client.models()
    with pytest.raises(NotFoundError):
        client.task("toy-file")


def test_cancel_a_queued_and_a_running_job(client, cli):
    running = client.learn("long-one", toy_rows(), config=LONG_CONFIG)
    queued = client.learn("long-two", toy_rows(), config=LONG_CONFIG)
    cancelled = client.cancel(queued.id)
    assert cancelled.id == queued.id and cancelled.status == "cancelled"
    with pytest.raises(ConflictError) as e:
        queued.cancel()
    assert e.value.param == "job_id" and "already cancelled" in e.value.message

    code, out, err = cli("cancel", running.id, "--url", client.url)
    assert code == 0, err
    assert out.startswith(running.id)
    final = running.wait(poll=0.2, timeout=60)  # a cancelled job is returned, not raised
    assert final.status == "cancelled"
    assert "long-one" not in client.models() and "long-two" not in client.models()


def test_async_client(served):
    async def main():
        async with AsyncClient(served.url, timeout=60) as c:
            g = await c.generate("beta", "hello", max_new_tokens=10)
            stream = c.stream("beta", "hello", max_new_tokens=10)
            pieces = [p async for p in stream]
            assert "".join(pieces) == g.text and stream.finish_reason == g.finish_reason
            body = await c.complete("beta", "hello", max_tokens=10, temperature=0)
            assert body["choices"][0]["text"] == g.text
            assert (await c.models())[:2] == ["@base", "@stack"]
            assert (await c.task("alpha")).order == 0
            assert "beta" in [t.name for t in await c.tasks()]
            assert (await c.health())["ready"]
            with pytest.raises(NotFoundError):
                await c.task("nope")
            with pytest.raises(NotFoundError):
                [p async for p in c.stream("nope", "hi")]
            with pytest.raises(ConflictError):
                await c.learn("beta", toy_rows()[:4])

            seen = []

            async def progress(job):
                seen.append(job.status)

            job = await c.learn("async-toy", toy_rows(), config={**FAST_CONFIG, "epochs": 1})
            final = await job.wait(poll=0.2, timeout=120, on_progress=progress)
            assert final.status == "succeeded" and final.step == final.total_steps == 3
            assert seen[-1] == "succeeded"
            assert any(j.id == job.id for j in await c.jobs())
            assert (await c.job(job.id)).status == "succeeded"

    asyncio.run(main())


# -- the command line --------------------------------------------------------------------------------------------

def test_generate_streams_the_same_text_as_the_client(served, cli):
    with Client(served.url) as c:
        expected = c.generate("alpha", "hello there", max_new_tokens=10).text
    code, out, err = cli("generate", "--url", served.url, "--task", "alpha", "-n", "10", "hello there")
    assert code == 0, err
    assert out == expected + "\n"
    code, out, err = cli("generate", "--url", served.url, "--task", "alpha", "-n", "10", "--no-stream", "-",
                         stdin="hello there")
    assert code == 0 and out == expected + "\n"
    code, out, err = cli("generate", "--url", served.url, "--task", "nope", "hi")
    assert code == 1 and err.startswith("jumplora: task 'nope' is not served") and "Traceback" not in err


def test_tasks_models_and_health(served, cli):
    code, out, err = cli("tasks", "--url", served.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ORDER", "METHOD", "REGULARIZER", "DENSITY", "NONZERO", "OVERLAP",
                                "HELDOUT_EM"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["alpha"][1] == "0" and rows["beta"][1] == "1" and rows["alpha"][2] == "jumplora"
    assert lines[0].index("DENSITY") == lines[1].index(rows[lines[1].split()[0]][4])  # aligned columns
    code, out, _ = cli("tasks", "--url", served.url, "--json")
    assert code == 0 and {"alpha", "beta"} <= {t["name"] for t in json.loads(out)["tasks"]}
    code, out, _ = cli("models", "--url", served.url)
    assert code == 0 and out.splitlines()[:2] == ["@base", "@stack"] and "alpha" in out.splitlines()
    code, out, _ = cli("health", "--url", served.url)
    assert code == 0 and out.startswith("live, ready")


def test_learn_wait_then_jobs(served, cli, tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_rows()))
    options = ["--epochs", "1", "--learning-rate", str(TOY_CONFIG["learning_rate"]), "--batch-size", "8",
               "--eval-fraction", "0.25", "--seed", "3"]
    code, out, err = cli("learn", "cli-toy", str(path), *options, "--wait", "--poll", "0.2", "--url", served.url)
    assert code == 0, err
    job_id = out.splitlines()[0]
    assert job_id.startswith("job-")
    progress = err.splitlines()  # stderr is not a terminal: one plain line per change, no \r
    assert progress and "\r" not in err and progress[-1].startswith(f"{job_id} cli-toy succeeded")
    assert "3/3" in progress[-1] and "loss" in progress[-1]
    assert "heldout_exact_match" in out and out.splitlines()[1].split() == ["METRIC", "VALUE"]
    with Client(served.url) as c:
        job = c.job(job_id)
        assert job.status == "succeeded" and job.config["batch_size"] == 8 and job.config["epochs"] == 1
        assert c.task("cli-toy").method == "jumplora"

    code, out, err = cli("jobs", "--url", served.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TASK", "STATUS", "STEP", "LOSS", "DENSITY", "ETA", "ERROR"]
    row = next(line.split() for line in lines[1:] if line.startswith(job_id))
    assert row[1:4] == ["cli-toy", "succeeded", "3/3"]
    code, out, _ = cli("jobs", "--url", served.url, "--json")
    assert code == 0 and job_id in [j["id"] for j in json.loads(out)["jobs"]]

    code, out, err = cli("learn", "cli-toy", str(path), "--url", served.url)  # the name is taken now
    assert code == 1 and err.startswith("jumplora: task 'cli-toy' already exists") and out == ""
    code, out, err = cli("learn", "other", str(tmp_path / "missing.jsonl"), "--url", served.url)
    assert code == 1 and "missing.jsonl" in err

    code, out, err = cli("delete", "cli-toy", "--url", served.url)
    assert code == 0 and out.startswith("cli-toy: no longer served"), err
    code, out, err = cli("delete", "cli-toy", "--url", served.url)
    assert code == 1 and err.startswith("jumplora: task 'cli-toy' is not served")
