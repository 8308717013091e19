"""The scheduler: continuous batching, per-request sampling, stop strings, cancellation, limits, and bank swaps."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from server.bank import BASE, STACK, build_state, make_stack
from server.engine import Engine, Failed, Finished, Token
from server.errors import BadRequest, NotFound, Overloaded
from server.metrics import Metrics
from server.model import merged_deltas
from server.runner import ModelRunner, projection_layout
from server.sampling import SamplingParams
from support import make_bank


@pytest.fixture(scope="module")
def bank(tiny_base, tmp_path_factory):
    return make_bank(tiny_base.model, tmp_path_factory.mktemp("bank-store"), tiny_base.fingerprint)


def make_engine(base, state, *, start=True, max_batch=8, max_queue=64, max_len=128, prefill_budget=256,
                kernel=None, merged_mb=0, merged_min_steps=0):
    runner = ModelRunner(base.model, max_rows=max_batch, max_len=max_len)
    engine = Engine(runner, base.tokenizer, state, Metrics(), max_batch=max_batch, max_queue=max_queue,
                    max_len=max_len, prefill_budget=prefill_budget, sparse_kernel=kernel, merged_mb=merged_mb,
                    merged_min_steps=merged_min_steps)
    if start:
        engine.start()
    return engine


async def collect(handle):
    tokens, pieces = [], []
    while True:
        ev = await handle.queue.get()
        if isinstance(ev, Failed):
            raise ev.error
        if isinstance(ev, Token):
            tokens.append(ev.token_id)
            pieces.append(ev.text)
        else:
            assert isinstance(ev, Finished)
            return tokens, "".join(pieces) + ev.tail, ev


def run(engine, requests, delays=None):
    """Submit (task, prompt, params) requests, the i-th after delays[i] seconds; return their results."""
    async def main():
        loop = asyncio.get_running_loop()

        async def one(i, req):
            await asyncio.sleep(delays[i] if delays else 0)
            return await collect(engine.submit(*req, "test", loop))
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return asyncio.run(main())


def reference_greedy(base, refs, task, prompt, n):
    """Greedy tokens from transformers' own forward on the model with the task's delta merged in."""
    ids = base.tokenizer(prompt)["input_ids"]
    out = []
    with merged_deltas(base.model, refs[task]), torch.no_grad():
        for _ in range(n):
            nxt = int(base.model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == base.tokenizer.eos_token_id:
                break
            out.append(nxt)
    return out


MIX = [("sparse-a", "the cat sat", 9), ("dense-b", "on a mat", 4), (BASE, "hello", 12),
       (STACK, "zz top", 7), ("lowrank-c", "abc def ghi", 10), ("sparse-a", "q", 3), (STACK, "more text", 11),
       ("chain-d", "a chained task", 9)]


@pytest.mark.parametrize("merged_mb", [0, 64], ids=["unmerged", "merged"])  # the cache of shared adapters' weights
@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "kernel"])  # the decode rows' sparse deltas
@pytest.mark.parametrize("prefill_budget", [256, 3])  # 3: prompts are chunked over several steps
def test_continuous_batching_matches_alone_and_merged_reference(tiny_base, bank, prefill_budget, compiled, merged_mb,
                                                                request):
    """Requests alone run on one route (with the cache: merged weights), together on several."""
    state, refs = bank
    # Fewer rows than requests: some wait, then join the running batch.
    kernel = request.getfixturevalue("sparse_kernel") if compiled else None
    engine = make_engine(tiny_base, state, max_batch=4, prefill_budget=prefill_budget, kernel=kernel,
                         merged_mb=merged_mb)
    assert (engine._kernel.kernel if engine._kernel else None) is kernel
    assert (engine._merged is not None) == bool(merged_mb)
    try:
        reqs = [(task, prompt, SamplingParams(max_new_tokens=n)) for task, prompt, n in MIX]
        together = run(engine, reqs, delays=[0, 0, 0.05, 0.1, 0.1, 0.2, 0.3, 0.3])
        for (task, prompt, n), (tokens, text, fin) in zip(MIX, together):
            alone_tokens, alone_text, _ = run(engine, [(task, prompt, SamplingParams(max_new_tokens=n))])[0]
            assert tokens == alone_tokens, task
            assert text == alone_text == tiny_base.tokenizer.decode(tokens)
            assert tokens == reference_greedy(tiny_base, refs, task, prompt, n), task
            assert fin.completion_tokens == len(tokens)
            assert fin.finish_reason == ("length" if len(tokens) == n else "eos")
            assert fin.prompt_tokens == len(tiny_base.tokenizer(prompt)["input_ids"])
        assert engine.running == 0
        if merged_mb:  # every task's route ran alone on merged weights (@stack on its own)
            assert {tuple(a.name for a in e[0].route) for e in engine._merged._entries.values()} >= {
                ("sparse-a",), ("dense-b",), ("lowrank-c",), ("sparse-a", "chain-d")}
    finally:
        engine.stop()


def test_merged_weights_are_built_only_for_a_batch_that_lasts(tiny_base, bank, sparse_kernel):
    """With merged_min_steps 20: a request alone that may take 6 tokens runs its route's deltas (no build),
    one that may take 24 builds the route's merged weights, and a later short one on that route uses them.
    Every answer is the merged reference's greedy text."""
    state, refs = bank
    engine = make_engine(tiny_base, state, kernel=sparse_kernel, merged_mb=64, merged_min_steps=20)

    def built():
        return [tuple(a.name for a in e[0].route) for e in engine._merged._entries.values()]

    try:
        for task, n, after in [("chain-d", 6, []), ("chain-d", 24, [("sparse-a", "chain-d")]),
                               ("chain-d", 6, [("sparse-a", "chain-d")]), ("sparse-a", 6, [("sparse-a", "chain-d")])]:
            tokens = run(engine, [(task, "a chained task", SamplingParams(max_new_tokens=n, ignore_eos=True))])[0][0]
            assert built() == after, (task, n)
            ref = reference_greedy(tiny_base, refs, task, "a chained task", n)  # (stops at an end of sequence)
            assert tokens[:len(ref)] == ref, (task, n)
    finally:
        engine.stop()


CHURN = [("sparse-a", "one two three four five six seven", 2), (STACK, "a b", 3), ("dense-b", "x y z w v u", 1),
         (BASE, "the quick brown fox jumps", 4), ("lowrank-c", "hi", 2), ("sparse-a", "lorem ipsum dolor sit amet", 1),
         (STACK, "one more prompt here", 3), ("dense-b", "q r", 2), (BASE, "alpha beta gamma delta", 1),
         ("sparse-a", "zz", 4), ("lowrank-c", "many words in this prompt to chunk", 2), (STACK, "end", 1)]


@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "kernel"])
def test_rows_turning_over_while_prompts_are_chunked_keep_every_cache_intact(tiny_base, bank, compiled, request):
    """All at once into 3 rows with a prefill budget of 5 tokens: prompts span steps, several end in the same
    step, and a finished prompt's decode row is often held by another prompt still being prefilled (which
    must move out of the way with the chunk it just wrote)."""
    state, refs = bank
    kernel = request.getfixturevalue("sparse_kernel") if compiled else None
    engine = make_engine(tiny_base, state, max_batch=3, prefill_budget=5, kernel=kernel)
    try:
        together = run(engine, [(t, p, SamplingParams(max_new_tokens=n)) for t, p, n in CHURN])
        for (task, prompt, n), (tokens, _, _) in zip(CHURN, together):
            assert tokens == reference_greedy(tiny_base, refs, task, prompt, n), (task, prompt)
        assert engine.running == 0
    finally:
        engine.stop()


def test_stop_string_cuts_the_text(tiny_base, bank):
    state, _ = bank
    engine = make_engine(tiny_base, state)
    try:
        _, full, _ = run(engine, [("sparse-a", "the cat sat", SamplingParams(max_new_tokens=20))])[0]
        stop = full[5:8]
        assert stop and full.find(stop) >= 0
        _, text, fin = run(engine, [("sparse-a", "the cat sat", SamplingParams(max_new_tokens=20, stop=[stop]))])[0]
        assert fin.finish_reason == "stop"
        assert text == fin.text == full[:full.find(stop)]
    finally:
        engine.stop()


def test_same_seed_same_text_other_seed_other_text(tiny_base, bank):
    state, _ = bank
    engine = make_engine(tiny_base, state)
    try:
        def sampled(seed):
            p = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
            return run(engine, [("dense-b", "the cat", p), (BASE, "other row", p)])[0][1]
        a, b, c = sampled(7), sampled(7), sampled(8)
        assert a == b
        assert a != c
    finally:
        engine.stop()


def test_top_k_one_is_greedy(tiny_base, bank):
    state, _ = bank
    engine = make_engine(tiny_base, state)
    try:
        greedy = run(engine, [(STACK, "abc", SamplingParams(max_new_tokens=10))])[0][0]
        top1 = run(engine, [(STACK, "abc", SamplingParams(max_new_tokens=10, temperature=0.7, top_k=1, seed=1))])
        assert top1[0][0] == greedy
    finally:
        engine.stop()


def test_cancel_frees_the_row(tiny_base, bank):
    state, _ = bank
    engine = make_engine(tiny_base, state, max_len=512)

    async def main():
        handle = engine.submit(BASE, "long one", SamplingParams(max_new_tokens=400), "test",
                               asyncio.get_running_loop())
        assert isinstance(await handle.queue.get(), Token)  # admitted: the first token is out
        deadline = time.monotonic() + 5
        while engine.running != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert engine.running == 1
        handle.cancel()
        deadline = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return engine.running
    try:
        assert asyncio.run(main()) == 0
    finally:
        engine.stop()


def test_limits_unknown_task_context_and_full_queue(tiny_base, bank):
    state, _ = bank
    engine = make_engine(tiny_base, state, start=False, max_queue=1, max_len=32)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(NotFound, match="nope"):
            engine.submit("nope", "x", SamplingParams(), "test", loop)
        with pytest.raises(BadRequest, match=r"\(30\).*over the context of 32"):
            engine.submit(BASE, "hello", SamplingParams(max_new_tokens=30), "test", loop)
        engine.submit(BASE, "a", SamplingParams(max_new_tokens=2), "test", loop)
        with pytest.raises(Overloaded) as e:
            engine.submit(BASE, "b", SamplingParams(max_new_tokens=2), "test", loop)
        assert int(e.value.headers["Retry-After"]) >= 1
    finally:
        loop.close()


def test_new_state_serves_new_requests_and_leaves_requests_in_flight_alone(tiny_base, bank):
    state, refs = bank
    engine = make_engine(tiny_base, state, merged_mb=64)
    # A second state without the dense task: @stack changes.
    sums = {}
    for name in state.tasks:
        if name != "dense-b":
            for layers, delta in state.route(name)[-1].groups.items():
                sums.setdefault(layers, np.zeros(delta.shape, dtype=np.float32))
                sums[layers] += delta.to_dense().numpy()
    weights = {n: m.weight for n, m in tiny_base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    stack = make_stack(sums, weights, projection_layout(tiny_base.model))
    smaller = build_state([(info, state.route(name)) for name, info in state.tasks.items() if name != "dense-b"],
                          stack, version=2)
    def merged_sets():
        return [{a.name for a in e[0].route} for e in engine._merged._entries.values()]

    try:
        run(engine, [("dense-b", "alone", SamplingParams(max_new_tokens=2))])
        assert {"dense-b"} in merged_sets()
        before = run(engine, [(STACK, "steady", SamplingParams(max_new_tokens=30))])[0][0]

        async def main():
            loop = asyncio.get_running_loop()
            handle = engine.submit(STACK, "steady", SamplingParams(max_new_tokens=30), "test", loop)
            first = await handle.queue.get()
            engine.set_state(smaller)  # swapped in while the request is running
            tokens, _, _ = await collect(handle)
            return [first.token_id] + tokens
        assert asyncio.run(main()) == before
        after = run(engine, [(STACK, "steady", SamplingParams(max_new_tokens=30))])[0][0]
        stack_without_b = {k: refs[STACK][k] - refs["dense-b"][k] for k in refs["sparse-a"]}
        assert after == reference_greedy(tiny_base, {STACK: stack_without_b}, STACK, "steady", 30)
        with pytest.raises(NotFound):
            engine.submit("dense-b", "x", SamplingParams(), "test", asyncio.new_event_loop())
        assert not any("dense-b" in names for names in merged_sets())  # the deleted task's merged weights went
    finally:
        engine.stop()


# -- one request's failure is that request's alone -------------------------------------------------------------

FAULT_MIX = [("sparse-a", "the cat sat", 12), (BASE, "hello there", 10), ("chain-d", "a chained task", 11)]


async def outcome(handle, timeout: float = 20):
    """("ok", tokens) or ("failed", error), within ``timeout`` (a request never answered fails the test)."""
    try:
        tokens, _, _ = await asyncio.wait_for(collect(handle), timeout)
        return "ok", tokens
    except asyncio.TimeoutError:
        raise AssertionError("the request was never answered") from None
    except Exception as e:
        return "failed", e


def run_with_bad(engine, bad: tuple, delays=(0, 0.02, 0.04, 0.06)):
    """The good requests of FAULT_MIX with ``bad`` (task, prompt, params) submitted among them."""
    async def main():
        loop = asyncio.get_running_loop()
        reqs = [(t, p, SamplingParams(max_new_tokens=n)) for t, p, n in FAULT_MIX[:2]] + [bad] + \
            [(t, p, SamplingParams(max_new_tokens=n)) for t, p, n in FAULT_MIX[2:]]

        async def one(i, req):
            await asyncio.sleep(delays[i])
            return await outcome(engine.submit(*req, "test", loop))
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
    results = asyncio.run(main())
    return results[:2] + results[3:], results[2]


def check_good(tiny_base, bank, good):
    _, refs = bank
    for (task, prompt, n), (status, tokens) in zip(FAULT_MIX, good):
        assert status == "ok", (task, tokens)
        assert tokens == reference_greedy(tiny_base, refs, task, prompt, n), task


def test_a_request_whose_admission_fails_is_answered_and_alone_in_failing(tiny_base, bank, monkeypatch):
    import server.engine as engine_module
    real = engine_module.make_generator

    def make_generator(params):
        if params.seed == 666:
            raise RuntimeError("bad generator")
        return real(params)
    monkeypatch.setattr(engine_module, "make_generator", make_generator)
    engine = make_engine(tiny_base, bank[0], max_batch=4)
    try:
        good, (status, error) = run_with_bad(
            engine, ("sparse-a", "x", SamplingParams(max_new_tokens=5, temperature=1.0, seed=666)))
        assert status == "failed" and error.status == 500 and "RuntimeError" in error.message
        check_good(tiny_base, bank, good)
        assert engine.running == 0
    finally:
        engine.stop()


@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "kernel"])
def test_a_prompt_whose_forward_fails_fails_alone(tiny_base, bank, monkeypatch, compiled, request):
    """The forward with the bad prompt's chunk raises: the decode rows and every other chunk of that step are
    run again apart, and only the bad request fails (its cache row is zeroed)."""
    kernel = request.getfixturevalue("sparse_kernel") if compiled else None
    engine = make_engine(tiny_base, bank[0], max_batch=4, kernel=kernel)
    poison = tiny_base.tokenizer("~POISON~", add_special_tokens=False)["input_ids"]
    real_step = engine.runner.step

    def step(tokens, positions, chunks, plan):
        if any(c.token_ids[-len(poison):] == poison for c in chunks):
            raise RuntimeError("this prompt breaks the forward")
        return real_step(tokens, positions, chunks, plan)
    monkeypatch.setattr(engine.runner, "step", step)
    try:
        good, (status, error) = run_with_bad(engine, ("dense-b", "~POISON~", SamplingParams(max_new_tokens=5)),
                                             delays=(0, 0.05, 0.05, 0.05))
        assert status == "failed" and error.status == 500
        check_good(tiny_base, bank, good)
        assert engine.running == 0
    finally:
        engine.stop()


def test_a_row_that_fails_while_decoding_fails_alone(tiny_base, bank, monkeypatch):
    """Detokenizing one row's token raises after a few tokens; the rows decoding beside it go on, and their
    tokens are those of the reference (the failed row's cache was zeroed and its row given back)."""
    import server.engine as engine_module
    real = engine_module.Detokenizer

    marker = tiny_base.tokenizer("!", add_special_tokens=False)["input_ids"][-1]

    class Breaking(real):
        def __init__(self, tokenizer, prompt_ids, stop):
            super().__init__(tokenizer, prompt_ids, stop)
            self.breaks, self.pushed = prompt_ids[-1:] == [marker], 0

        def push(self, token_id):
            self.pushed += 1
            if self.breaks and self.pushed > 3:
                raise ValueError("undecodable")
            return super().push(token_id)
    monkeypatch.setattr(engine_module, "Detokenizer", Breaking)
    engine = make_engine(tiny_base, bank[0], max_batch=4)
    try:
        good, (status, error) = run_with_bad(engine, (STACK, "boom!", SamplingParams(max_new_tokens=20)))
        assert status == "failed" and "ValueError" in error.message
        check_good(tiny_base, bank, good)
        assert engine.running == 0
    finally:
        engine.stop()
