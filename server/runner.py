"""The model runner: our own forward pass over the base model's weights (Llama-family decoders), with a KV cache
in fixed rows and a per-row adapter delta on the targeted projections.

Why not the transformers forward: continuous batching needs every row at its own position with its own cache
length, rows joining and leaving between decode steps, and the adapter of each row applied in one vectorised
call. The transformers modules are reused for their weights (and for the MLP and norms); the attention, the
rotary positions and the cache layout are ours. Outputs match the transformers forward (tested to 1e-4)."""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import ModelLoadError

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class Plan(Protocol):
    """What the runner needs from the adapter bank: a projection with each row's own delta."""

    def project(self, layer: str, lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x: (N, d_in) -> (N, d_out) = x·Wᵀ (+ bias) + each row's Δ·x, rows as planned for this forward."""


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
        self.lm_head = model.get_output_embeddings()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.max_len = max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(len(self.layers), max_rows, self.n_kv, max_len, self.head_dim, self.dtype, self.device)
        # Each block's projections by short name, with the module paths the adapter bank knows them by.
        path_of = {id(m): n for n, m in model.named_modules()}
        self.projs: list[dict[str, tuple[str, torch.nn.Linear]]] = []
        for layer in self.layers:
            mods = {k: getattr(layer.self_attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
            mods.update({k: getattr(layer.mlp, k) for k in ("gate_proj", "up_proj", "down_proj")})
            self.projs.append({k: (path_of[id(m)], m) for k, m in mods.items()})

    # -- building blocks -------------------------------------------------------------------------------------

    def _project(self, layer_idx: int, which: str, x: torch.Tensor, plan: Plan | None) -> torch.Tensor:
        path, lin = self.projs[layer_idx][which]
        if plan is None:
            return F.linear(x, lin.weight, lin.bias)  # (N, d_out)
        return plan.project(path, lin, x)

    def _rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions: (N, head_dim) each, from the model's own rotary module."""
        cos, sin = self.decoder.rotary_emb(like, positions.view(1, -1))
        return cos[0], sin[0]

    def _qkv(self, i: int, h: torch.Tensor, cos, sin, plan):
        """h: (N, d) -> q (N, H, hd), k and v (N, KV, hd), with rotary positions applied."""
        attn = self.layers[i].self_attn
        n = h.shape[0]
        q = self._project(i, "q_proj", h, plan).view(n, self.n_heads, self.head_dim)
        k = self._project(i, "k_proj", h, plan).view(n, self.n_kv, self.head_dim)
        v = self._project(i, "v_proj", h, plan).view(n, self.n_kv, self.head_dim)
        if hasattr(attn, "q_norm"):  # qwen3 normalises q and k per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        c, s = cos[:, None, :], sin[:, None, :]
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s, v

    def _block_tail(self, i: int, resid: torch.Tensor, attn_out: torch.Tensor, plan) -> torch.Tensor:
        layer = self.layers[i]
        h = resid + self._project(i, "o_proj", attn_out, plan)
        x = layer.post_attention_layernorm(h)
        gated = layer.mlp.act_fn(self._project(i, "gate_proj", x, plan)) * self._project(i, "up_proj", x, plan)
        return h + self._project(i, "down_proj", gated, plan)

    # -- prefill: one request, T tokens ----------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, row: int, token_ids: list[int], plan: Plan | None) -> torch.Tensor:
        """Run a prompt for cache row ``row`` from position 0; return the last position's logits (vocab,) fp32."""
        t = len(token_ids)
        self.cache.ensure_clean(t)
        ids = torch.tensor(token_ids, device=self.device)
        h = self.decoder.embed_tokens(ids)  # (T, d)
        cos, sin = self._rope(torch.arange(t, device=self.device), h)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, layer.input_layernorm(h), cos, sin, plan)  # (T, H|KV, hd)
            self.cache.k[i][row, :, :t] = k.transpose(0, 1)
            self.cache.v[i][row, :, :t] = v.transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, scale=self.scale, enable_gqa=self.group > 1)  # (1, H, T, hd)
            h = self._block_tail(i, h, out[0].transpose(0, 1).reshape(t, -1), plan)
        last = self.decoder.norm(h[-1:])  # (1, d)
        return self.lm_head(last)[0].float()

    # -- decode: n rows, one token each ----------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, plan: Plan | None) -> torch.Tensor:
        """One step for rows 0..n-1: ``token_ids`` (n,) at ``positions`` (n,) (each row's current length).
        Returns logits (n, vocab) fp32."""
        n = token_ids.shape[0]
        span = int(positions.max()) + 1  # attend over positions < span; shorter rows are masked
        self.cache.ensure_clean(span)
        rows = torch.arange(n, device=self.device)
        h = self.decoder.embed_tokens(token_ids)  # (n, d)
        cos, sin = self._rope(positions, h)
        # (n, 1, 1, span): True where a position lies beyond the row's own length
        masked = (torch.arange(span, device=self.device)[None, :] > positions[:, None])[:, None, None, :]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, layer.input_layernorm(h), cos, sin, plan)  # (n, H|KV, hd)
            kc, vc = self.cache.k[i], self.cache.v[i]
            kc[rows, :, positions] = k
            vc[rows, :, positions] = v
            keys = kc[:n, :, :span]  # (n, KV, span, hd): a strided view, no copy
            values = vc[:n, :, :span]
            qg = q.view(n, self.n_kv, self.group, self.head_dim)  # (n, KV, G, hd): GQA without repeating K/V
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale  # (n, KV, G, span)
            scores = scores.masked_fill(masked, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
            out = torch.matmul(probs, values).reshape(n, -1)  # (n, H*hd)
            h = self._block_tail(i, h, out, plan)
        return self.lm_head(self.decoder.norm(h)).float()  # (n, vocab)
