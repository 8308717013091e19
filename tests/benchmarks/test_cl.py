"""The continual-learning harness (``python -m benchmarks.cl``): its metrics, row sampling, and an end-to-end run
on the tiny model with two toy tasks, interrupted and resumed."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from benchmarks import cl
from benchmarks.cl_report import backward_transfer, markdown, overall_accuracy, plot

# -- metrics ---------------------------------------------------------------------------------------------------


def test_overall_accuracy_and_backward_transfer_on_hand_made_matrices():
    a = [[0.8],
         [0.6, 0.9],
         [0.5, 0.7, 1.0]]
    assert overall_accuracy(a) == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    assert backward_transfer(a) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    # no forgetting, some gain on an earlier task
    b = [[0.5], [0.75, 0.25]]
    assert overall_accuracy(b) == pytest.approx(0.5)
    assert backward_transfer(b) == pytest.approx(0.25)
    # one task: OA is its accuracy, BWT is undefined (None)
    assert overall_accuracy([[0.4]]) == pytest.approx(0.4)
    assert backward_transfer([[0.4]]) is None
    # the last row's diagonal does not enter BWT
    c = [[1.0], [1.0, 0.0]]
    assert backward_transfer(c) == 0.0 and overall_accuracy(c) == 0.5


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [[0.1], [0.2]], [[0.1], [0.2, 0.3, 0.4]]])
def test_metrics_refuse_a_matrix_that_is_not_lower_triangular(bad):
    with pytest.raises(ValueError):
        overall_accuracy(bad)
    with pytest.raises(ValueError):
        backward_transfer(bad)


def test_normalize_lowercases_and_collapses_whitespace():
    assert cl.normalize("  Science  or\nTechnology ") == cl.normalize("science or technology")
    assert cl.normalize("World.") != cl.normalize("world")


# -- rows ------------------------------------------------------------------------------------------------------

TOY_TASKS = {
    "fruit": (["apple", "pear", "plum", "fig", "kiwi", "lime", "mango", "peach"], "(f)", " fruit",
              ["leek", "kale", "corn", "okra", "bean", "pea", "beet", "chard"], "(v)", " veg"),
    "size": (["whale", "house", "truck", "tower", "mountain", "ship", "bus", "barn"], "(b)", " big",
             ["ant", "coin", "seed", "bead", "pin", "grain", "flea", "dot"], "(s)", " small"),
}


def write_toy_benchmark(folder: Path) -> Path:
    """Two tiny tasks in the benchmark format: a marker in the prompt decides the answer."""
    for task, (xs, mx, cx, ys, my, cy) in TOY_TASKS.items():
        d = folder / task
        d.mkdir(parents=True)
        rows = [{"prompt": f"{task}: {w} {mx}\nanswer:", "completion": cx, "label": cx.strip()} for w in xs]
        rows += [{"prompt": f"{task}: {w} {my}\nanswer:", "completion": cy, "label": cy.strip()} for w in ys]
        train = rows[0:6] + rows[8:14]
        test = rows[6:8] + rows[14:16]
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
        (d / "task.json").write_text(json.dumps({"task_name": task, "options": [cx.strip(), cy.strip()]}))
    (folder / "orders.json").write_text(json.dumps({"toy": list(TOY_TASKS), "one": ["fruit"]}))
    return folder


def test_rows_are_balanced_over_labels_deterministic_and_length_filtered(tmp_path):
    data = write_toy_benchmark(tmp_path / "data")
    bench = cl.Benchmark(data, "toy", n_train=4, n_test=0, max_seq_len=512, chars_per_token=1.0, seed=0)
    rows = bench.train("fruit", rejected=set())
    assert [r["label"] for r in rows].count("fruit") == 2 and [r["label"] for r in rows].count("veg") == 2
    again = cl.Benchmark(data, "toy", n_train=4, n_test=0, max_seq_len=512, chars_per_token=1.0, seed=0)
    assert again.train("fruit", set()) == rows
    assert len(bench.test["fruit"]) == 4  # 0: all
    # a rejected row is replaced by another of the same label
    replaced = bench.train("fruit", rejected={rows[0]["id"]})
    assert rows[0] not in replaced and len(replaced) == 4
    assert sorted(r["label"] for r in replaced) == sorted(r["label"] for r in rows)
    # the length estimate: characters / chars_per_token + 2 (BOS, EOS) within max_seq_len
    short = cl.Benchmark(data, "toy", n_train=0, n_test=0, max_seq_len=30, chars_per_token=1.0, seed=0)
    assert all(len(r["prompt"]) + len(r["completion"]) <= 28 for r in short.train("fruit", set()))
    assert 0 < len(short.train("fruit", set())) < 12


def test_the_subset_ships_balanced_and_small():
    subset = Path(cl.__file__).resolve().parent / "data" / "cl-subset"
    orders = json.loads((subset / "orders.json").read_text())
    assert set(orders) == {"short_order_1", "short_order_2", "short_order_3"}
    size = sum(p.stat().st_size for p in subset.rglob("*") if p.is_file())
    assert size < 4 * 2**20
    for task in orders["short_order_1"]:
        assert (subset / task / "task.json").is_file()
        for split in ("train", "test"):
            labels = [r["label"] for r in cl.read_rows(subset / task / f"{split}.jsonl")]
            counts = {label: labels.count(label) for label in set(labels)}
            assert len(set(counts.values())) == 1, (task, split, counts)


def test_a_row_over_max_seq_len_is_replaced_and_remembered(tmp_path):
    """The server's 422 naming a row as too long: that row is excluded for good and the task posted again."""
    data = write_toy_benchmark(tmp_path / "data")
    bench = cl.Benchmark(data, "toy", n_train=4, n_test=0, max_seq_len=512, chars_per_token=1.0, seed=0)
    state = cl.State(tmp_path / "state.json", {"x": 1})
    first = bench.train("fruit", set())
    too_long = first[2]["prompt"]
    posted = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        posted.append(body)
        for i, row in enumerate(body["data"]):
            if row["prompt"] == too_long:
                return httpx.Response(422, json={"error": {"message": f"data[{i}]: 99 tokens (prompt, completion and "
                                                           "end of sequence), over max_seq_len 64",
                                                           "type": "invalid_request_error", "param": f"data[{i}]"}})
        return httpx.Response(202, json={"job_id": "job-1", "task": body["name"], "status": "queued",
                                         "status_url": "/v1/jobs/job-1"})

    client = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    def rows_fn():
        return [{**r, "task": "fruit"} for r in bench.train("fruit", state.rejected("fruit"))]

    accepted, rows = cl.submit_task(client, state, "fruit", rows_fn, {"epochs": 1})
    assert accepted["job_id"] == "job-1" and len(posted) == 2
    assert state.rejected("fruit") == {first[2]["id"]}
    assert len(rows) == 4 and too_long not in [r["prompt"] for r in rows]
    assert json.loads((tmp_path / "state.json").read_text())["rejected"] == {"fruit": [first[2]["id"]]}


def test_report_from_hand_made_results(tmp_path):
    results = {
        "order": "toy", "tasks": ["a", "b"], "data": "d", "model": "m", "settings": {"train_rows": 2, "test_rows": 2},
        "test_rows_used": {"a": 2, "b": 2},
        "methods": {
            "jumplora+incremental": {
                "matrices": {"stack": [[1.0], [0.5, 1.0]], "routing": [[1.0], [1.0, 0.5]]},
                "OA": {"stack": 0.75, "routing": 0.75}, "BWT": {"stack": -0.5, "routing": 0.0},
                "adapters": {"a": {"density": 0.01, "overlap_ratio": 0.0},
                             "b": {"density": 0.02, "overlap_ratio": 0.1}},
                "timings": {"total_s": 3.0}},
            "multitask": {"matrices": {"routing": [[1.0, 0.5]]}, "OA": {"routing": 0.75}, "BWT": {"routing": None},
                          "adapters": {}, "timings": {"total_s": 1.0}},
        }}
    md = markdown(results)
    assert "| jumplora+incremental | stack | 75.0 | -50.0 | 100.0 |" in md
    assert "| jumplora+incremental | routing | 75.0 | 0.0 | 75.0 |" in md
    assert "| multitask | routing | 75.0 | – | – |" in md
    assert "1.00 / 0.0" in md and "2.00 / 10.0" in md
    plot(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_with_other_settings_in_the_same_out_is_refused(tmp_path):
    data = write_toy_benchmark(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    cl.State(out / "state.json", {"seed": 0}).save()
    with pytest.raises(SystemExit, match="other settings"):
        cl.run(["--data", str(data), "--order", "toy", "--out", str(out), "--url", "http://127.0.0.1:9",
                "--methods", "multitask"])


# -- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # (about 40 s; the default suite keeps under 10 minutes)
def test_end_to_end_on_the_tiny_model_interrupted_after_the_first_task_and_resumed(tiny_model_dir, tmp_path):
    data = write_toy_benchmark(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--data", str(data), "--order", "toy", "--methods", "jumplora+incremental", "multitask",
            "--train-rows", "8", "--test-rows", "4", "--epochs", "1", "--batch-size", "4", "--lr", "0.01",
            "--max-seq-len", "64", "--chars-per-token", "1", "--max-new-tokens", "4", "--train-threads", "1",
            "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]

    # 1. stopped after the first task: submitted, learned, evaluated
    assert cl.main(argv + ["--stop-after", "3"]) == 3
    state = json.loads((out / "state.json").read_text())
    first = state["methods"]["jumplora+incremental"]
    assert list(first["learned"]) == ["fruit"] and list(first["evals"]) == ["0"] and not first["done"]
    fruit_job = first["learned"]["fruit"]["job_id"]
    partial = json.loads((out / "results.json").read_text())
    assert [len(row) for row in partial["methods"]["jumplora+incremental"]["matrices"]["stack"]] == [1]
    assert not partial["methods"]["jumplora+incremental"]["complete"]

    # 2. resumed: the first task is not learned again; everything else is done
    assert cl.main(argv) == 0
    state = json.loads((out / "state.json").read_text())
    learned_steps = [s for s in state["log"] if s["step"] == "learned" and s["method"] == "jumplora+incremental"]
    assert [s["task"] for s in learned_steps] == ["fruit", "size"]
    results = json.loads((out / "results.json").read_text())
    m = results["methods"]["jumplora+incremental"]
    assert m["complete"]
    jobs = {j["task"]: j for j in m["jobs"]}
    assert len(m["jobs"]) == 2 and jobs["fruit"]["id"] == fruit_job  # the server's job list: one job per task
    assert all(j["status"] == "succeeded" for j in m["jobs"])
    for mode in ("stack", "routing"):
        a = m["matrices"][mode]
        assert [len(row) for row in a] == [1, 2]
        assert all(0.0 <= x <= 1.0 for row in a for x in row)
        counts = m["counts"][mode]
        assert [[c["n"] for c in row] for row in counts] == [[4], [4, 4]]
        assert a == [[c["correct"] / c["n"] for c in row] for row in counts]
        assert m["OA"][mode] == pytest.approx((a[1][0] + a[1][1]) / 2)
        assert m["BWT"][mode] == pytest.approx(a[1][0] - a[0][0])
    assert set(m["adapters"]) == {"fruit", "size"}
    assert m["adapters"]["fruit"]["overlap_ratio"] == 0.0 and 0 < m["adapters"]["size"]["density"] < 1
    mt = results["methods"]["multitask"]
    assert [len(row) for row in mt["matrices"]["routing"]] == [2] and mt["BWT"]["routing"] is None
    assert mt["OA"]["routing"] == pytest.approx(sum(mt["matrices"]["routing"][0]) / 2)
    assert [j["n_rows"] for j in mt["jobs"]] == [16]
    md = (out / "results.md").read_text()
    assert "| jumplora+incremental | stack |" in md and "| multitask | routing |" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "jumplora+incremental" / "server.pid").exists()

    # 3. once more: nothing left to do, no server started
    assert cl.main(argv) == 0
    assert json.loads((out / "state.json").read_text())["log"] == state["log"]


@pytest.mark.slow
def test_a_job_interrupted_by_the_stop_is_waited_for_or_submitted_again(tiny_model_dir, tmp_path):
    """Stopped right after the job is submitted (its server stops with it): on resume the job is either still
    queued (and runs) or was failed by the server as interrupted (and the task is submitted again)."""
    data = write_toy_benchmark(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--data", str(data), "--order", "one", "--methods", "jumplora+incremental", "--modes", "routing",
            "--train-rows", "4", "--test-rows", "2", "--batch-size", "4", "--max-seq-len", "64",
            "--chars-per-token", "1", "--max-new-tokens", "2", "--train-threads", "1",
            "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert cl.main(argv + ["--stop-after", "1"]) == 3
    state = json.loads((out / "state.json").read_text())
    first_job = state["methods"]["jumplora+incremental"]["submitted"]["fruit"]
    assert "fruit" not in state["methods"]["jumplora+incremental"]["learned"]

    assert cl.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    m = results["methods"]["jumplora+incremental"]
    jobs = [j for j in m["jobs"] if j["task"] == "fruit"]
    assert jobs[-1]["status"] == "succeeded"
    assert all(j["status"] in ("failed", "cancelled") for j in jobs[:-1])
    assert jobs[0]["id"] == first_job and len(jobs) in (1, 2)
    submitted = [s for s in json.loads((out / "state.json").read_text())["log"] if s["step"] == "submitted"]
    assert len(submitted) == len(jobs)
    assert [len(row) for row in m["matrices"]["routing"]] == [1] and "stack" not in m["matrices"]
    assert m["BWT"]["routing"] is None and m["OA"]["routing"] == m["matrices"]["routing"][0][0]
