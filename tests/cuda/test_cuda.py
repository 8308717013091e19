"""CUDA only (``pytest -m cuda``; ``benchmarks/gpu_check.sh`` runs them on a GPU machine; the default suite
deselects them): the runner in bf16 on the GPU against fp32 on the CPU, CUDA-graph replays against eager steps,
the engine with and without graphs, the Triton sparse-delta kernel against torch, and a server that learns a task
with its worker on the GPU and serves it."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_base(tiny_model_dir, tmp_path_factory):
    from server.model import load_base

    assert torch.cuda.is_available(), "these tests need a CUDA device"
    return load_base(tiny_model_dir, tmp_path_factory.mktemp("cache"), device="cuda", dtype="bfloat16")


@pytest.fixture(scope="module")
def cuda_bank(cuda_base, tmp_path_factory):
    from support import make_bank

    return make_bank(cuda_base.model, tmp_path_factory.mktemp("bank"), cuda_base.fingerprint)


def _prompts(tokenizer):
    return [tokenizer(p)["input_ids"] for p in ["the cat sat", "on a mat with", "x", "hello there, friend"]]


def test_bf16_runner_on_cuda_matches_fp32_on_cpu(cuda_base, tiny_base):
    from server.runner import ModelRunner

    ids = _prompts(tiny_base.tokenizer)
    gpu = ModelRunner(cuda_base.model, max_rows=4, max_len=64)
    cpu = ModelRunner(tiny_base.model, max_rows=4, max_len=64)
    for row, p in enumerate(ids):
        a, b = gpu.prefill(row, p, None), cpu.prefill(row, p, None)
        assert torch.allclose(a.float().cpu(), b, atol=0.05, rtol=0.05)


def test_graph_replays_match_eager_steps(cuda_base, cuda_bank):
    from server.bank import BASE, STACK, Plan
    from server.cuda_graphs import DecodeGraphs
    from server.runner import ModelRunner

    state, _ = cuda_bank
    ids = _prompts(cuda_base.tokenizer)
    for name in (BASE, STACK):
        route = state.route(name)
        runners = [ModelRunner(cuda_base.model, max_rows=8, max_len=64) for _ in range(2)]
        for runner in runners:
            for row, p in enumerate(ids):
                runner.prefill(row, p, Plan([], [(0, len(p), route)], runner.device))
        graphs = DecodeGraphs(runners[1])
        positions = torch.tensor([len(p) for p in ids], device="cuda")
        tokens = torch.tensor([3, 4, 5, 6], device="cuda")
        for n in (4, 3, 1):  # padded to 4, 4 and 1 rows
            plan = Plan([route] * n, (), runners[0].device)
            eager = runners[0].step(tokens[:n], positions[:n], [], plan)[0]
            replay = graphs.run(tokens[:n], positions[:n], plan)
            assert replay is not None and torch.allclose(replay.float(), eager.float(), atol=2e-2, rtol=2e-2)
            positions = positions + 1
    assert graphs.run(tokens, positions, Plan([state.route("sparse-a")] * 4, (), "cuda")) is None


def test_engine_with_graphs_gives_the_tokens_of_the_eager_engine(tiny_model_dir, tmp_path):
    from server.bank import BASE, STACK
    from server.engine import Engine
    from server.metrics import Metrics
    from server.model import load_base
    from server.runner import ModelRunner
    from server.sampling import SamplingParams
    from support import make_bank

    base = load_base(tiny_model_dir, tmp_path / "cache", device="cuda", dtype="float32")
    state, _ = make_bank(base.model, tmp_path / "bank", base.fingerprint)
    outs = []
    for graphs in (False, True):
        runner = ModelRunner(base.model, max_rows=8, max_len=128)
        engine = Engine(runner, base.tokenizer, state, Metrics(), max_batch=8, max_queue=64, max_len=128,
                        cuda_graphs=graphs)
        engine.start()
        try:
            async def main():
                loop = asyncio.get_running_loop()
                reqs = [(t, p) for t in (BASE, STACK, "sparse-a", "chain-d") for p in ("the cat", "hello")]
                handles = [engine.submit(t, p, SamplingParams(max_new_tokens=12), "test", loop) for t, p in reqs]
                texts = []
                for h in handles:
                    while True:
                        ev = await h.queue.get()
                        if hasattr(ev, "finish_reason"):
                            texts.append(ev.text)
                            break
                        assert not hasattr(ev, "error"), ev.error
                return texts
            outs.append(asyncio.run(main()))
        finally:
            engine.stop()
    assert outs[0] == outs[1]


def test_triton_kernel_on_cuda_matches_torch(cuda_bank):
    """The plan on CUDA with the Triton kernel (compiled, not interpreted) against the same plan on torch's
    products, over every projection group, decode rows and a prompt segment on mixed routes."""
    from server import triton_delta
    from server.bank import BASE, KernelTables, Plan
    from server.kernels import Linear

    state, _ = cuda_bank
    assert triton_delta.applies_to(torch.device("cuda"))
    rows = [state.route(n) for n in ("sparse-a", "chain-d", BASE, "dense-b", "chain-d", "lowrank-c")]
    segments = [(6, 10, state.route("chain-d"))]
    dev = torch.device("cuda")
    with_kernel = Plan(rows, segments, dev, KernelTables(triton_delta.TritonDeltas()))
    without = Plan(rows, segments, dev)
    for layers, delta in state.route("chain-d")[-1].groups.items():
        lin = Linear([torch.zeros(delta.shape[0], delta.shape[1], device=dev, dtype=torch.bfloat16)])
        x = torch.randn(10, delta.shape[1], device=dev, dtype=torch.bfloat16)
        got, expected = with_kernel.project(layers, lin, x).float(), without.project(layers, lin, x).float()
        assert torch.allclose(got, expected, atol=2e-2, rtol=2e-2), layers
        assert with_kernel._groups[layers][0] is not None


def test_a_server_on_cuda_learns_with_its_worker_on_the_gpu(tiny_model_dir, start_server):
    from support import TOY_CONFIG, toy_rows, wait_job

    server = start_server(tiny_model_dir, extra_args=["--device", "cuda"])
    r = httpx.post(server.url + "/v1/tasks", json={"name": "toy", "data": toy_rows(), "config": TOY_CONFIG},
                   timeout=60)
    assert r.status_code == 202, r.text
    job = wait_job(server.url, r.json()["job_id"], log=server.log)
    assert job["status"] == "succeeded", job
    assert job["metrics"]["heldout_exact_match"] >= 0.75, job["metrics"]
    g = httpx.post(server.url + "/v1/generate", json={"task": "toy", "prompt": "item: walnut (f)\nclass:",
                                                      "max_new_tokens": 3}, timeout=60)
    assert g.status_code == 200 and g.json()["text"].strip() == "fruit"
