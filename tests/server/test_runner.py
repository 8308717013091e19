"""The runner and the adapter bank: every row of a mixed batch equals that request run alone (greedy tokens,
logits within 1e-4 in fp32), and equals a plain copy of the model with the delta merged into its weights."""
from __future__ import annotations

import pytest
import torch

from server.bank import BASE, STACK, BlockTables, RowPlan, StepPlan
from server.model import merged_deltas
from server.runner import ModelRunner
from support import make_bank

STEPS = 6
PROMPTS = ["the cat sat", "on a mat with", "x", "hello there, friend", "abc def", "zz top"]


@pytest.fixture(scope="module")
def bank(tiny_base):
    return make_bank(tiny_base.model)


def test_representations_are_as_intended(bank):
    state, _ = bank
    layer = "model.layers.0.self_attn.q_proj"
    kinds = [state.layers[layer][state.slots[n]].kind for n in ("sparse-a", "dense-b", "lowrank-c", STACK)]
    assert kinds == ["sparse", "dense", "lowrank", "dense"]
    assert layer in state.stack_weights


def test_stack_products_copy_only_the_groups_that_tasks_adapt(tiny_base, bank):
    state, _ = bank
    runner = ModelRunner(tiny_base.model, max_rows=2, max_len=16)
    qkv, o = runner.groups[0][("q_proj", "k_proj", "v_proj")], runner.groups[0][("o_proj",)]
    assert state.stack_linear(*o) is o[1]  # o_proj is not a target: the base product itself
    merged = state.stack_linear(*qkv)
    assert merged is not qkv[1] and merged is state.stack_linear(*qkv)  # built once
    x = torch.randn(3, qkv[1].parts[0][0].shape[1])
    q_path = qkv[0][0]
    assert torch.allclose(merged(x)[:, :qkv[1].widths[0]], x @ state.stack_weights[q_path].T, atol=1e-5)


def _greedy(runner, plan_rows, prompts_ids, steps, kernel=None):
    """Prefill each prompt into its own row, then decode all rows together for ``steps`` greedy steps (the
    decode rows' sparse deltas through ``kernel`` when given). Returns per row: the generated tokens and the
    logits that chose each (first from the prefill)."""
    tokens, logits = [], []
    for row, (adapter, ids) in enumerate(zip(plan_rows, prompts_ids)):
        lg = runner.prefill(row, ids, StepPlan(None, [(0, len(ids), adapter)]))
        tokens.append([int(lg.argmax())])
        logits.append([lg])
    plan = StepPlan(RowPlan(plan_rows, runner.device, kernel=kernel), [])
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
    ["sparse-a", "sparse-a", BASE],
    [STACK, STACK, STACK],
])
@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "kernel"])
def test_mixed_batch_rows_equal_alone_and_merged_reference(tiny_base, bank, mix, compiled, request):
    state, refs = bank
    runner = ModelRunner(tiny_base.model, max_rows=8, max_len=64)
    tok = tiny_base.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:len(mix)]]
    rows = [(state, state.slot_of(name)) for name in mix]
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
    rows = [(state, state.slot_of(n)) for n in ("sparse-a", "dense-b", "lowrank-c")]
    expected, _ = _greedy(runner, [rows[2]], [ids[2]], STEPS)
    tokens, _ = _greedy(runner, rows, ids, 2)  # three rows, two steps
    runner.cache.move_row(2, 0, len(ids[2]) + 2)  # row 0 leaves; row 2 moves to 0; row 1 stays
    seq = tokens[2]
    plan = StepPlan(RowPlan([rows[2], rows[1]], runner.device), [])
    pos = torch.tensor([len(ids[2]) + 2, len(ids[1]) + 2])
    last = torch.tensor([tokens[2][-1], tokens[1][-1]])
    for _ in range(STEPS - 2):
        lg = runner.decode(last, pos, plan)
        pos += 1
        seq.append(int(lg[0].argmax()))
        last = lg.argmax(-1)
    assert seq == expected[0]


def _reference(refs, names, paths, widths, x):
    """The slow per-row reference: each row's dense delta of each layer in the group times its input, the layers'
    outputs side by side: (len(names), Σ widths)."""
    out = torch.zeros(len(names), sum(widths))
    for i, name in enumerate(names):
        start = 0
        for path, width in zip(paths, widths):
            if path in refs[name]:
                out[i, start:start + width] = refs[name][path].float() @ x[i]
            start += width
    return out


@pytest.mark.parametrize("mix", [
    ["sparse-a", "sparse-a", "sparse-a", BASE, "dense-b", "sparse-a"],  # by adapter, a base row left out
    ["sparse-a", STACK, "sparse-a", STACK, "lowrank-c", "dense-b"],  # mixed kinds
    ["sparse-a", "sparse-a"],  # every row adapted
])
def test_both_plan_layouts_equal_the_per_row_reference(tiny_base, bank, mix, sparse_kernel):
    """RowPlan.add by row, by adapter and through the compiled kernel against the slow reference: each row's
    dense delta times its input."""
    state, refs = bank
    runner = ModelRunner(tiny_base.model, max_rows=8, max_len=64)
    rows = [(state, state.slot_of(name)) for name in mix]
    g = torch.Generator().manual_seed(5)
    for group in runner.groups:
        for paths, lin in group.values():
            d_in = lin.parts[0][0].shape[1]
            x = torch.randn(len(mix), d_in, generator=g)
            y0 = torch.randn(len(mix), sum(lin.widths), generator=g)
            expected = y0 + _reference(refs, mix, paths, lin.widths, x)
            layouts = []
            for by_adapter in (False, True):
                plan = RowPlan(rows, runner.device)
                plan.by_adapter = plan.by_adapter and by_adapter
                if by_adapter and not plan.by_adapter:
                    continue
                y = y0.clone()
                plan.add(paths, lin.widths, x, y)
                assert torch.allclose(y, expected, atol=1e-5), (paths, by_adapter, float((y - expected).abs().max()))
                layouts.append(by_adapter)
            assert layouts == [False, True]  # each mix shares adapters enough for both layouts
            y = y0.clone()
            RowPlan(rows, runner.device, kernel=sparse_kernel).add(paths, lin.widths, x, y)
            assert torch.allclose(y, expected, atol=1e-5), (paths, "kernel", float((y - expected).abs().max()))


def test_a_batch_change_that_keeps_the_adapters_keeps_the_block_products(tiny_base, bank):
    """Rows leave and join every few steps at 16-32 streams, mostly without changing the set of adapters: the block
    products stay (and stay right); a new set of adapters rebuilds them."""
    state, refs = bank
    runner = ModelRunner(tiny_base.model, max_rows=8, max_len=64)
    tables = BlockTables(8, runner.device)
    paths, lin = runner.groups[0][("q_proj", "k_proj", "v_proj")]
    d_in = lin.parts[0][0].shape[1]
    a = (state, state.slot_of("sparse-a"))
    s = (state, state.slot_of(STACK))
    first = RowPlan([a, a, a], runner.device, tables)
    second = RowPlan([a, (state, -1), a], runner.device, tables, previous=first)  # one left, a @base row joined
    third = RowPlan([a, s, a, s], runner.device, tables, previous=second)  # @stack joined: other adapters
    assert first.by_adapter and second.by_adapter and third.by_adapter
    g = torch.Generator().manual_seed(9)
    for plan, names in ((first, ["sparse-a"] * 3), (second, ["sparse-a", BASE, "sparse-a"]),
                        (third, ["sparse-a", STACK, "sparse-a", STACK])):
        x = torch.randn(len(names), d_in, generator=g)
        y = torch.zeros(len(names), sum(lin.widths))
        plan.add(paths, lin.widths, x, y)
        expected = _reference(refs, names, paths, lin.widths, x)
        assert torch.allclose(y, expected, atol=1e-5), names
    assert second._prepared is first._prepared  # reused: same adapters
    assert third._prepared is not second._prepared  # rebuilt: another set of adapters


def test_a_batch_change_that_keeps_the_adapters_keeps_the_kernel_tables(tiny_base, bank, sparse_kernel):
    """The same with the compiled kernel: its per-group CSR tables depend on the adapters alone, its row lists
    on the batch."""
    state, refs = bank
    runner = ModelRunner(tiny_base.model, max_rows=8, max_len=64)
    paths, lin = runner.groups[0][("q_proj", "k_proj", "v_proj")]
    d_in = lin.parts[0][0].shape[1]
    a, s, base = (state, state.slot_of("sparse-a")), (state, state.slot_of(STACK)), (state, -1)
    first = RowPlan([a, base, a], runner.device, kernel=sparse_kernel)
    second = RowPlan([base, a, a, a, a, a], runner.device, kernel=sparse_kernel, previous=first)
    third = RowPlan([a, s, base, a], runner.device, kernel=sparse_kernel, previous=second)  # @stack is dense here
    g = torch.Generator().manual_seed(11)
    for plan, names in ((first, ["sparse-a", BASE, "sparse-a"]),
                        (second, [BASE] + ["sparse-a"] * 5),
                        (third, ["sparse-a", STACK, BASE, "sparse-a"])):
        x = torch.randn(len(names), d_in, generator=g)
        y = torch.zeros(len(names), sum(lin.widths))
        plan.add(paths, lin.widths, x, y)
        assert torch.allclose(y, _reference(refs, names, paths, lin.widths, x), atol=1e-5), names
    assert second._prepared is first._prepared and third._prepared is not second._prepared


def test_block_table_grows_for_a_denser_block_and_shrinks_when_it_leaves():
    from server.bank import BlockTable, slot_delta

    g = torch.Generator().manual_seed(4)

    def delta(density):
        return slot_delta(torch.randn(6, 5, generator=g) * (torch.rand(6, 5, generator=g) < density),
                          dense_above=1.0)
    sparse_a, sparse_b, dense = delta(0.2), delta(0.2), delta(0.9)
    table = BlockTable(6, 5, max_rows=3, device=torch.device("cpu"))
    x = torch.randn(3, 5, generator=g)
    for blocks in ([sparse_a, sparse_b], [sparse_a, dense, sparse_b], [sparse_b, sparse_a]):
        m = table.matrix(blocks)
        expected = torch.cat([b.to_dense() @ x[i] for i, b in enumerate(blocks)])
        assert torch.allclose(m @ x[:len(blocks)].reshape(-1), expected, atol=1e-6)
        assert table.capacity >= max(b.nnz for b in blocks)
        assert table.capacity <= 2 * max(b.nnz for b in blocks) + 1  # padding stays within twice the need
