"""The model runner: our own forward pass over the base model's weights (Llama-family decoders), with a KV cache
in fixed rows and a per-row adapter delta on the targeted projections.

Why not the transformers forward: continuous batching needs every row at its own position with its own cache
length, rows joining and leaving between decode steps, and the adapter of each row applied in one vectorised
call. The transformers modules are reused for their weights (and for the MLP and norms); the attention, the
rotary positions and the cache layout are ours. Outputs match the transformers forward (tested to 1e-4)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import ModelLoadError
from .kernels import Linear

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class Plan(Protocol):
    """What the runner needs from the adapter bank: a projection with each row's own delta."""

    def project(self, layers: tuple[str, ...], lin: Linear, x: torch.Tensor) -> torch.Tensor:
        """For a group of projections of the same input x (N, d_in), fused in ``lin`` (their outputs side by
        side): x·Wᵀ (+ bias) + Δ·x of each position's own adapter, as planned for this forward: (N, Σ d_out)."""


# The projections of a block that share their input, each group one fused product (server/kernels.py).
QKV, O, GATE_UP, DOWN = ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)


def projection_layout(model) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """Every projection group of the model's blocks: its layers' module paths (q/k/v; o; gate/up; down) and
    each one's d_out. The adapter bank keeps each adapter's delta per group (``server/bank.py``)."""
    path_of = {id(m): n for n, m in model.named_modules()}
    layout = []
    for layer in model.model.layers:
        mods = {k: getattr(layer.self_attn, k) for k in QKV + O}
        mods.update({k: getattr(layer.mlp, k) for k in GATE_UP + DOWN})
        for group in (QKV, O, GATE_UP, DOWN):
            layout.append((tuple(path_of[id(mods[k])] for k in group),
                           tuple(int(mods[k].weight.shape[0]) for k in group)))
    return layout


@dataclass(frozen=True)
class Chunk:
    """Part of a prompt to prefill: ``token_ids`` go to cache row ``row`` at positions start..end-1."""

    row: int
    token_ids: list[int]
    start: int
    last: bool  # the chunk ends the prompt: its last position's logits choose the first new token

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Keys and values of every layer in fixed rows: (rows, n_kv, capacity, head_dim) per layer. Active requests
    occupy rows 0..n-1 (the engine keeps them packed), so a decode step reads a plain prefix of the rows.
    Memory is reserved with ``torch.empty`` and zeroed only up to the longest position used so far: pages no
    request reaches are never touched. (Zeroing matters: attention weights of 0 on a masked position still
    multiply its value, and uninitialised memory may hold NaN.)"""

    CHUNK = 64

    def __init__(self, n_layers: int, rows: int, n_kv: int, capacity: int, head_dim: int, dtype, device):
        shape = (rows, n_kv, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.rows, self.capacity = rows, capacity
        self.clean = 0  # positions [0, clean) of every row hold finite values

    def ensure_clean(self, span: int) -> None:
        """Zero positions [clean, span) of every row (in chunks), before anything is written there."""
        if span <= self.clean:
            return
        end = min(self.capacity, -(-span // self.CHUNK) * self.CHUNK)
        for k, v in zip(self.k, self.v):
            k[:, :, self.clean:end].zero_()
            v[:, :, self.clean:end].zero_()
        self.clean = end

    def swap_rows(self, a: int, b: int, length: int) -> None:
        """Exchange the first ``length`` positions of rows ``a`` and ``b`` (the right side is a copy)."""
        for k, v in zip(self.k, self.v):
            k[[a, b], :, :length] = k[[b, a], :, :length]
            v[[a, b], :, :length] = v[[b, a], :, :length]

    def clear_row(self, row: int, length: int) -> None:
        """Zero the first ``length`` positions of ``row`` (a failed request's: they may not be finite)."""
        for k, v in zip(self.k, self.v):
            k[row, :, :length].zero_()
            v[row, :, :length].zero_()

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` to row ``dst`` (compaction after a row leaves)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


class ModelRunner:
    """Prefill and decode on a frozen transformers decoder. Not thread-safe: one engine thread owns it."""

    def __init__(self, model, max_rows: int, max_len: int):
        cfg = model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"model type {getattr(cfg, 'model_type', None)!r} is not supported by the serving engine "
                f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
        self.model = model
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        head = model.get_output_embeddings()
        self.lm_head = Linear([head.weight], [head.bias])  # packed for the CPU's GEMM library (server/kernels.py)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.max_len = max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # one position more than any request reaches: where the padding rows of a fixed-size decode step write
        # (``step(..., span=...)``, the CUDA graphs of server/cuda_graphs.py); every request masks it
        self.spare = max_len
        self.cache = KVCache(len(self.layers), max_rows, self.n_kv, max_len + 1, self.head_dim, self.dtype,
                             self.device)
        # Each block's projection groups: the module paths the adapter bank knows them by, and their fused
        # base-weight product (packed for the CPU's GEMM library: server/kernels.py).
        path_of = {id(m): n for n, m in model.named_modules()}
        self.groups: list[dict[tuple[str, ...], tuple[tuple[str, ...], Linear]]] = []
        for layer in self.layers:
            mods = {k: getattr(layer.self_attn, k) for k in QKV + O}
            mods.update({k: getattr(layer.mlp, k) for k in GATE_UP + DOWN})
            self.groups.append({
                group: (tuple(path_of[id(mods[k])] for k in group),
                        Linear([mods[k].weight for k in group], [mods[k].bias for k in group]))
                for group in (QKV, O, GATE_UP, DOWN)})

    # -- building blocks -------------------------------------------------------------------------------------

    def _project(self, layer_idx: int, group: tuple[str, ...], x: torch.Tensor, plan: Plan | None) -> torch.Tensor:
        """The projection group ``group`` of block ``layer_idx`` of input x (N, d_in): (N, Σ d_out), the
        group's outputs side by side."""
        paths, lin = self.groups[layer_idx][group]
        if plan is None:
            return lin(x)
        return plan.project(paths, lin, x)

    def _rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions: (N, head_dim) each, from the model's own rotary module."""
        cos, sin = self.decoder.rotary_emb(like, positions.view(1, -1))
        return cos[0], sin[0]

    def _qkv(self, i: int, h: torch.Tensor, cos, sin, plan):
        """h: (N, d) -> q (N, H, hd), k and v (N, KV, hd), with rotary positions applied."""
        attn = self.layers[i].self_attn
        n = h.shape[0]
        q, k, v = self._project(i, QKV, h, plan).split(self.groups[i][QKV][1].widths, dim=-1)
        q = q.view(n, self.n_heads, self.head_dim)
        k = k.view(n, self.n_kv, self.head_dim)
        v = v.view(n, self.n_kv, self.head_dim)
        if hasattr(attn, "q_norm"):  # qwen3 normalises q and k per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        c, s = cos[:, None, :], sin[:, None, :]
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s, v

    def _block_tail(self, i: int, resid: torch.Tensor, attn_out: torch.Tensor, plan) -> torch.Tensor:
        layer = self.layers[i]
        h = resid + self._project(i, O, attn_out, plan)
        gate, up = self._project(i, GATE_UP, layer.post_attention_layernorm(h), plan).split(
            self.groups[i][GATE_UP][1].widths, dim=-1)
        return h + self._project(i, DOWN, layer.mlp.act_fn(gate) * up, plan)

    # -- one step: decode rows and prompt chunks in one forward ----------------------------------------------

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, chunks: list[Chunk],
             plan: Plan | None, span: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """One forward over rows 0..n-1 decoding one token each (``tokens`` and ``positions``: (n,)), plus prompt
        chunks of other rows. The weights are read once for all of it, which is what makes adding prefill to a
        decode step nearly free on a memory-bound machine.

        ``span``: the decode rows attend over cache positions [0, span) (masked beyond each row's own); by
        default the longest row's length. A fixed span (the cache's capacity), with no chunks, makes the step's
        shapes and work independent of the positions and free of host synchronisation, as a CUDA graph needs;
        the cache must then be finite up to it (``cache.ensure_clean``), and rows padding a batch to a fixed
        size take position ``spare``.

        Returns the decode rows' logits (n, vocab) fp32, and per chunk the logits after its last token
        (vocab,) when the chunk ends its prompt, else None."""
        n = int(tokens.shape[0])
        dev = self.device
        fixed = span is not None
        ids = torch.cat([tokens.to(dev)] + [torch.tensor(c.token_ids, device=dev) for c in chunks])  # (N,)
        pos = torch.cat([positions.to(dev)] + [torch.arange(c.start, c.end, device=dev) for c in chunks])  # (N,)
        bounds, offset = [], n
        for c in chunks:
            bounds.append((offset, offset + len(c.token_ids)))
            offset += len(c.token_ids)
        if not fixed:
            span = int(positions.max()) + 1 if n else 0  # decode rows attend over positions < span
            self.cache.ensure_clean(max([span] + [c.end for c in chunks]))
        rows = torch.arange(n, device=dev)
        # (n, 1, 1, span): True where a position lies beyond the row's own length
        masked = (torch.arange(span, device=dev)[None, :] > positions.to(dev)[:, None])[:, None, None, :]
        chunk_masks = [None if c.start == 0 else  # (T, end): a prompt token sees the cache up to itself
                       torch.arange(c.end, device=dev)[None, :] <= torch.arange(c.start, c.end, device=dev)[:, None]
                       for c in chunks]
        h = self.decoder.embed_tokens(ids)  # (N, d)
        cos, sin = self._rope(pos, h)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, layer.input_layernorm(h), cos, sin, plan)  # (N, H|KV, hd)
            kc, vc = self.cache.k[i], self.cache.v[i]
            out = torch.empty(q.shape[0], self.n_heads * self.head_dim, dtype=q.dtype, device=dev)  # (N, H*hd)
            if n:
                kc[rows, :, positions] = k[:n]
                vc[rows, :, positions] = v[:n]
                keys, values = kc[:n, :, :span], vc[:n, :, :span]  # (n, KV, span, hd): strided views, no copy
                qg = q[:n].view(n, self.n_kv, self.group, self.head_dim)  # (n, KV, G, hd): GQA, K/V not repeated
                scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale  # (n, KV, G, span)
                probs = torch.softmax(scores.masked_fill(masked, float("-inf")).float(), dim=-1).to(values.dtype)
                out[:n] = torch.matmul(probs, values).reshape(n, -1)
            for c, (a, b), mask in zip(chunks, bounds, chunk_masks):
                kc[c.row, :, c.start:c.end] = k[a:b].transpose(0, 1)
                vc[c.row, :, c.start:c.end] = v[a:b].transpose(0, 1)
                attn = F.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1)[None], kc[c.row, :, :c.end][None], vc[c.row, :, :c.end][None],
                    attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=self.group > 1)
                out[a:b] = attn[0].transpose(0, 1).reshape(b - a, -1)  # (T, H*hd)
            h = self._block_tail(i, h, out, plan)
        last = [b - 1 for c, (_, b) in zip(chunks, bounds) if c.last]
        picked = torch.cat([rows, torch.tensor(last, dtype=torch.long, device=dev)]) if last else rows
        logits = self.lm_head(self.decoder.norm(h[picked])).float()  # (n + chunks that end, vocab)
        chunk_logits, j = [], n
        for c in chunks:
            chunk_logits.append(logits[j] if c.last else None)
            j += c.last
        return logits[:n], chunk_logits

    def prefill(self, row: int, token_ids: list[int], plan: Plan | None) -> torch.Tensor:
        """A whole prompt for row ``row`` alone; the last position's logits (vocab,)."""
        empty = torch.empty(0, dtype=torch.long)
        return self.step(empty, empty, [Chunk(row, list(token_ids), 0, True)], plan)[1][0]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, plan: Plan | None) -> torch.Tensor:
        """One decode step for rows 0..n-1 alone; logits (n, vocab)."""
        return self.step(tokens, positions, [], plan)[0]
