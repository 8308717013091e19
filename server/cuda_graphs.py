"""Decode steps replayed from CUDA graphs (CUDA only).

A decode step of a small model on a GPU is a few hundred short kernels, each launched from Python: the launches,
not the GPU, set its pace. A CUDA graph records the step's kernels once and replays them with one launch. The
recorded step must have fixed shapes and no host synchronisation, which ``ModelRunner.step(..., span=...)`` gives:
the batch is padded to the next captured size (padding rows decode token 0 at the runner's ``spare`` position,
which every request masks) and attention covers the cache's whole capacity. Inputs are copied into the graph's
own buffers before each replay; its logits buffer is read after it.

Which steps: decode-only steps (no prompt chunk) whose rows need no per-row delta, that is all on ``@base``, or
all on one ``@stack`` (its merged weights: one set of graphs per ``@stack`` adapter, captured again when a new
task changes it). Steps with task adapters run eagerly (their plan's products depend on which rows hold which
adapters)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def graph_key(plan) -> tuple | None:
    """What a captured graph of this plan depends on: ("base",) for no delta, ("stack", id) for merged
    weights; None when the plan applies per-row deltas (not captured)."""
    if plan is not None and plan.members:
        return None
    if plan is None or plan.merged is None:
        return ("base",)
    return ("stack", id(plan.merged))


class DecodeGraphs:
    """Captured decode steps of ``runner`` for batch sizes up to its cache rows, made on first use."""

    def __init__(self, runner):
        if runner.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.runner = runner
        rows = runner.cache.rows
        self.sizes = sorted({s for s in SIZES if s < rows} | {rows})
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple] = {}  # (size, key) -> (graph, tokens (size,), positions (size,), logits)
        self.stack_id: int | None = None
        runner.cache.ensure_clean(runner.cache.capacity)  # every replay attends over all of it

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, plan) -> torch.Tensor | None:
        """Logits (n, vocab) of a decode step of rows 0..n-1 by replay, or None if this step is not one that
        graphs serve (the caller then runs it eagerly)."""
        key = graph_key(plan)
        n = int(tokens.shape[0])
        if key is None or n == 0 or n > self.sizes[-1]:
            return None
        if key[0] == "stack" and key[1] != self.stack_id:  # a new @stack: drop the old one's graphs
            self.graphs = {k: v for k, v in self.graphs.items() if k[1][0] != "stack"}
            self.stack_id = key[1]
        size = next(s for s in self.sizes if s >= n)
        entry = self.graphs.get((size, key))
        if entry is None:
            entry = self.graphs[(size, key)] = self._capture(size, plan)
        graph, tok, pos, logits = entry
        tok[:n].copy_(tokens)
        tok[n:].zero_()
        pos[:n].copy_(positions)
        pos[n:].fill_(self.runner.spare)
        graph.replay()
        return logits[:n]

    @torch.inference_mode()
    def _capture(self, size: int, plan) -> tuple:
        r = self.runner
        tok = torch.zeros(size, dtype=torch.long, device=r.device)  # (size,)
        pos = torch.full((size,), r.spare, dtype=torch.long, device=r.device)  # (size,)
        span = r.cache.capacity
        # warm up on a side stream (lazy initialisations must not happen during capture); the padding rows
        # write only at the spare position, so rows 0..size-1 of the cache keep what they hold
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                r.step(tok, pos, [], plan, span=span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, _ = r.step(tok, pos, [], plan, span=span)  # (size, vocab)
        log.info("captured a CUDA graph of the decode step for %d rows", size)
        return graph, tok, pos, logits
