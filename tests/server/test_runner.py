"""The runner and the adapter bank: every row of a mixed batch equals that request run alone (greedy tokens,
logits within 1e-4 in fp32), and equals a plain copy of the model with its route's deltas merged into its
weights (a task trained on another is served with both)."""
from __future__ import annotations

import pytest
import torch

from server.bank import BASE, KERNEL_MAX_ROWS, STACK, KernelTables, Plan
from server.merged import MergedRoutes, merged_size
from server.model import merged_deltas
from server.runner import ModelRunner
from support import make_bank

STEPS = 6
PROMPTS = ["the cat sat", "on a mat with", "x", "hello there, friend", "abc def", "zz top"]


@pytest.fixture(scope="module")
def bank(tiny_base, tmp_path_factory):
    return make_bank(tiny_base.model, tmp_path_factory.mktemp("bank-store"), tiny_base.fingerprint)


def test_representations_and_routes_are_as_intended(bank):
    state, _ = bank
    qkv = next(iter(state.route("sparse-a")[0].groups))
    kinds = [state.route(n)[-1].groups[qkv].kind for n in ("sparse-a", "dense-b", "lowrank-c", STACK)]
    assert kinds == ["sparse", "dense", "lowrank", "dense"]
    served = state.route("sparse-a")[0].groups[qkv]
    # served compact: int16 columns and the stored bf16 values widened to fp32, 6 bytes a stored non-zero as
    # stored; the rows padded to a multiple of 4 and sorted by length within chunks of 64 (perm: their output rows)
    assert served.col.dtype == torch.int16 and served.val.dtype == torch.float32
    assert torch.equal(served.val, served.val.bfloat16().float())
    assert served.nbytes == 6 * served.col.numel() + 4 * (128 + 1) + 4 * 128
    lengths = served.crow[1:] - served.crow[:-1]
    assert bool((lengths % 4 == 0).all()) and int((served.val != 0).sum()) == served.nnz
    assert all(sorted(served.perm[c:c + 64].tolist()) == list(range(c, c + 64)) for c in (0, 64))
    assert all(bool((lengths[c:c + 64].diff() >= 0).all()) for c in (0, 64))
    assert "model.layers.0.self_attn.q_proj" in state.stack.merged
    # a task trained on another: both deltas, the parent's the very adapter its own route serves
    assert [a.name for a in state.route("chain-d")] == ["sparse-a", "chain-d"]
    assert state.route("chain-d")[0] is state.route("sparse-a")[0]
    assert state.tasks["chain-d"].route == ("sparse-a", "chain-d") and state.route(BASE) == ()


def test_stack_products_copy_only_the_groups_that_tasks_adapt(tiny_base, bank):
    state, _ = bank
    runner = ModelRunner(tiny_base.model, max_rows=2, max_len=16)
    qkv, o = runner.groups[0][("q_proj", "k_proj", "v_proj")], runner.groups[0][("o_proj",)]
    assert state.stack.merged_linear(*o) is o[1]  # o_proj is not a target: the base product itself
    merged = state.stack.merged_linear(*qkv)
    assert merged is not qkv[1] and merged is state.stack.merged_linear(*qkv)  # built once
    x = torch.randn(3, qkv[1].parts[0][0].shape[1])
    q_path = qkv[0][0]
    assert torch.allclose(merged(x)[:, :qkv[1].widths[0]], x @ state.stack.merged[q_path].T, atol=1e-5)


def _greedy(runner, plan_rows, prompts_ids, steps, kernel=None):
    """Prefill each prompt into its own row, then decode all rows together for ``steps`` greedy steps (the
    decode rows' sparse deltas through ``kernel`` when given). Returns per row: the generated tokens and the
    logits that chose each (first from the prefill)."""
    tokens, logits = [], []
    for row, (adapter, ids) in enumerate(zip(plan_rows, prompts_ids)):
        lg = runner.prefill(row, ids, Plan([], [(0, len(ids), adapter)], runner.device, kernel))
        tokens.append([int(lg.argmax())])
        logits.append([lg])
    plan = Plan(plan_rows, (), runner.device, kernel)
    positions = torch.tensor([len(ids) for ids in prompts_ids])
    for _ in range(steps):
        lg = runner.decode(torch.tensor([t[-1] for t in tokens]), positions, plan)
        positions += 1
        for i in range(len(plan_rows)):
            tokens[i].append(int(lg[i].argmax()))
            logits[i].append(lg[i])
    return tokens, logits


@pytest.mark.parametrize("mix", [
    ["sparse-a", "dense-b", "lowrank-c", STACK, BASE, "sparse-a"],
    ["sparse-a", "chain-d", BASE, "chain-d"],
    ["sparse-a", "sparse-a", BASE],
    [STACK, STACK, STACK],
])
@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "kernel"])
def test_mixed_batch_rows_equal_alone_and_merged_reference(tiny_base, bank, mix, compiled, request):
    state, refs = bank
    runner = ModelRunner(tiny_base.model, max_rows=8, max_len=64)
    tok = tiny_base.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:len(mix)]]
    rows = [state.route(name) for name in mix]
    kernel = request.getfixturevalue("sparse_kernel") if compiled else None
    mixed_tokens, mixed_logits = _greedy(runner, rows, ids, STEPS, kernel)
    for i, name in enumerate(mix):
        alone_tokens, alone_logits = _greedy(runner, [rows[i]], [ids[i]], STEPS)
        assert mixed_tokens[i] == alone_tokens[0], (name, i)
        for a, b in zip(mixed_logits[i], alone_logits[0]):
            assert torch.allclose(a, b, atol=1e-4, rtol=0), (name, float((a - b).abs().max()))
        # The merged reference: transformers' own forward on a copy of the weights with W + delta.
        with merged_deltas(tiny_base.model, refs[name]), torch.no_grad():
            seq = torch.tensor([ids[i] + mixed_tokens[i][:-1]])
            ref = tiny_base.model(seq).logits[0, len(ids[i]) - 1:]  # (STEPS + 1, vocab)
        got = torch.stack(mixed_logits[i])
        assert torch.allclose(got, ref, atol=1e-4, rtol=0), (name, float((got - ref).abs().max()))
        assert mixed_tokens[i] == ref.argmax(-1).tolist()


def test_rows_leaving_and_moving_keep_their_cache(tiny_base, bank):
    """Compaction: when row 0 leaves, the last row moves into its place and continues unchanged."""
    state, _ = bank
    runner = ModelRunner(tiny_base.model, max_rows=4, max_len=64)
    tok = tiny_base.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    rows = [state.route(n) for n in ("sparse-a", "dense-b", "lowrank-c")]
    expected, _ = _greedy(runner, [rows[2]], [ids[2]], STEPS)
    tokens, _ = _greedy(runner, rows, ids, 2)  # three rows, two steps
    runner.cache.move_row(2, 0, len(ids[2]) + 2)  # row 0 leaves; row 2 moves to 0; row 1 stays
    seq = tokens[2]
    plan = Plan([rows[2], rows[1]], (), runner.device)
    pos = torch.tensor([len(ids[2]) + 2, len(ids[1]) + 2])
    last = torch.tensor([tokens[2][-1], tokens[1][-1]])
    for _ in range(STEPS - 2):
        lg = runner.decode(last, pos, plan)
        pos += 1
        seq.append(int(lg[0].argmax()))
        last = lg.argmax(-1)
    assert seq == expected[0]


def _reference(refs, names, paths, widths, x):
    """The slow per-position reference: each position's dense route delta of each layer in the group times its
    input, the layers' outputs side by side: (len(names), Σ widths)."""
    out = torch.zeros(len(names), sum(widths))
    for i, name in enumerate(names):
        start = 0
        for path, width in zip(paths, widths):
            if path in refs[name]:
                out[i, start:start + width] = refs[name][path].float() @ x[i]
            start += width
    return out


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("mix, segments, common", [
    (["sparse-a", "sparse-a", "sparse-a", BASE, "dense-b", "sparse-a"], [], ()),
    (["sparse-a", STACK, "chain-d", STACK, "lowrank-c", "dense-b"], [], ()),
    (["chain-d", "chain-d"], [("sparse-a", 3), ("chain-d", 2), (BASE, 2)], ()),  # prompt segments after the rows
    ([], [("chain-d", KERNEL_MAX_ROWS + 5), ("sparse-a", 4)], ()),  # a long prompt chunk (CUDA: torch's product)
    (["chain-d", "sparse-a", "chain-d"], [("sparse-a", 3)], ()),  # a shared parent: not a route of all, unmerged
    (["chain-d", "chain-d"], [("chain-d", 3)], ("sparse-a", "chain-d")),  # one route, all of it merged
    (["dense-b", "dense-b"], [], ("dense-b",)),
    (["lowrank-c"], [], ("lowrank-c",)),
])
def test_plans_equal_the_per_position_reference(tiny_base, bank, mix, segments, common, compiled, merged, request):
    """Plan.project against the slow reference, for every projection group: decode rows and prompt segments,
    one route or several, through the compiled kernel or torch's products; with the cache of merged weights,
    a forward on one route runs on the route's merged weights (server/merged.py)."""
    state, refs = bank
    runner = ModelRunner(tiny_base.model, max_rows=8, max_len=64)
    kernel = request.getfixturevalue("sparse_kernel") if compiled else None
    names, spans, offset = list(mix), [], len(mix)
    for name, length in segments:
        spans.append((offset, offset + length, state.route(name)))
        names += [name] * length
        offset += length
    cache = MergedRoutes(1 << 30, merged_size) if merged else None
    plan = Plan([state.route(n) for n in mix], spans, runner.device, kernel, cache)
    if merged and common:
        assert [a.name for a in plan.merged.route] == list(common) and plan.members == []
    else:
        assert plan.merged is None or plan.merged is state.stack
    g = torch.Generator().manual_seed(5)
    for group in runner.groups:
        for paths, lin in group.values():
            x = torch.randn(len(names), lin.parts[0][0].shape[1], generator=g)
            expected = lin(x) + _reference(refs, names, paths, lin.widths, x)
            got = plan.project(paths, lin, x)
            assert torch.allclose(got, expected, atol=1e-5), (paths, float((got - expected).abs().max()))


def test_the_cpu_kernel_takes_a_long_prompt_chunk(tiny_base, bank, sparse_kernel):
    """A prompt chunk of more positions than KERNEL_MAX_ROWS goes through the CPU kernel (2-6x faster than
    torch's CSR product there), not through torch's product; the results are checked against the reference in
    test_plans_equal_the_per_position_reference."""
    state, _ = bank
    runner = ModelRunner(tiny_base.model, max_rows=8, max_len=64)
    n = KERNEL_MAX_ROWS + 5
    plan = Plan([], [(0, n, state.route("sparse-a"))], runner.device, sparse_kernel)
    paths, _ = runner.groups[0][("q_proj", "k_proj", "v_proj")]
    kernel, rest = plan._prepare(paths)
    assert kernel is not None and rest == []
    assert kernel[1].rows.tolist() == list(range(n))


def test_kernel_tables_are_kept_while_the_adapters_stay(tiny_base, bank, sparse_kernel):
    """Rows join and leave every few steps at 16-32 streams, mostly without changing the set of adapters: the
    kernel's per-group tables (which depend on the adapters alone) are built once."""
    state, _ = bank
    runner = ModelRunner(tiny_base.model, max_rows=8, max_len=64)
    tables = KernelTables(sparse_kernel)
    paths, lin = runner.groups[0][("q_proj", "k_proj", "v_proj")]
    x = torch.randn(4, lin.parts[0][0].shape[1])
    a, d = state.route("sparse-a"), state.route("chain-d")
    first = Plan([a, d, a], (), runner.device, tables)
    second = Plan([d, a, (), a], (), runner.device, tables)  # one row joined, the same adapters
    first.project(paths, lin, x[:3])
    second.project(paths, lin, x)
    assert first._groups[paths][0][0] is second._groups[paths][0][0]
    third = Plan([a], (), runner.device, tables)  # another set of adapters
    third.project(paths, lin, x[:1])
    assert third._groups[paths][0][0] is not first._groups[paths][0][0]


@pytest.mark.parametrize("name", [BASE, STACK])
def test_a_fixed_span_step_padded_to_more_rows_matches_the_ordinary_step(tiny_base, bank, name):
    """The step CUDA graphs record (server/cuda_graphs.py), run here eagerly: 3 decode rows padded to 5, the
    padding rows at the spare position, attention over the whole capacity. The real rows' logits are the
    ordinary step's, and no cache position but the spare one differs, in any row (row 4 holds a prompt)."""
    from server.cuda_graphs import graph_key

    state, _ = bank
    route = state.route(name)
    prompts = [tiny_base.tokenizer(p)["input_ids"] for p in PROMPTS[:5]]
    runners = [ModelRunner(tiny_base.model, max_rows=6, max_len=48) for _ in range(2)]
    for runner in runners:
        for row, ids in enumerate(prompts):
            runner.prefill(row, ids, Plan([], [(0, len(ids), route)]))
    tokens = torch.tensor([5, 7, 9])
    positions = torch.tensor([len(ids) for ids in prompts[:3]])
    plan = Plan([route] * 3)
    assert graph_key(plan) == (("base",) if name == BASE else ("stack", id(state.stack)))
    ordinary = runners[0].step(tokens, positions, [], plan)[0]  # (3, vocab)
    fixed_runner = runners[1]
    fixed_runner.cache.ensure_clean(fixed_runner.cache.capacity)
    padded_tokens = torch.cat([tokens, torch.zeros(2, dtype=torch.long)])
    padded_positions = torch.cat([positions, torch.full((2,), fixed_runner.spare)])
    fixed = fixed_runner.step(padded_tokens, padded_positions, [], Plan([route] * 5),
                              span=fixed_runner.cache.capacity)[0]  # (5, vocab)
    assert torch.allclose(fixed[:3], ordinary, atol=1e-5)
    spare = fixed_runner.spare
    written = max(len(ids) for ids in prompts)
    for k0, k1 in zip(runners[0].cache.k + runners[0].cache.v, fixed_runner.cache.k + fixed_runner.cache.v):
        # every position alike but the spare one (a batch of 5 rows may round its products unlike one of 3)
        assert torch.allclose(k0[:, :, :spare], k1[:, :, :spare], atol=1e-5)
        assert torch.count_nonzero(k1[:, :, written:spare]) == 0
        assert torch.isfinite(k1[:, :, spare]).all()  # what the padding rows wrote: masked by all, finite
    assert graph_key(Plan([state.route("sparse-a")] * 2)) is None  # per-row deltas are not captured
