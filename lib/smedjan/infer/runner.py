"""Decoding: the model's own forward with per-layer state for every architecture
(`ModelRunner`), and a fast path for the plain Llama case (`Runner`).

Both offer the same interface to the engine: `new_cache(batch, max_len)`,
`prefill(cache, row, prompts, start)`, `decode(cache, tokens, lens)`,
`move_row(cache, src, dst, length)` and `truncatable` (whether a row filled to n
positions can be reused for a shorter prefix: a KV cache can, a recurrent state
cannot). `runner_for(model)` picks the fast path when the model is attention + SwiGLU
throughout (any GQA, per-layer windows, tied or untied head, soft-capped logits) and
the model's path otherwise; tests/test_infer_paths.py checks that both give the same
greedy tokens and logits.

The fast path. `Transformer.forward` is written for training (one shape, autograd, `is_causal`).
Decoding one token at a time on a CPU is dominated by per-op overhead and by how the
weights are read, so the runner keeps its own copy of the weights, re-laid out once:
- Q, K and V are one matrix, and so are the FFN's gate and up projections (3 and 2
  matmuls become 1 each);
- on a CPU with AVX2 (float32), one-row products run on a small compiled kernel
  (`smedjan.infer.cpu_kernel`) that streams each [out, in] weight row at memory
  speed; elsewhere matrices are stored transposed ([in, out], row-major), which the
  BLAS reads faster for a single activation row than `F.linear`'s [out, in];
- each RMSNorm gain, the norm's sqrt(dim), and the attention scale 1/sqrt(head_dim)
  are folded into the matrix that follows, so a norm costs one `vector_norm` and a
  `rsqrt`, and attention needs no scaling.
The arithmetic is the model's (same RoPE tables, GQA, sliding window, tied or untied
head); rounding differs only in float32's last bits. tests/test_infer_engine.py
checks greedy decoding against recomputing `Transformer.forward` at every step.

Rows of the cache may hold sequences of different lengths (continuous batching): a
decode step writes row r's new key/value at its own column `lens[r]` and masks the
columns beyond it. When all rows have the same length (batch 1 in particular) the
step takes a plain path with no mask and slice writes.

    runner = Runner(model)                                # model from load_model()
    cache = runner.new_cache(batch=2, max_len=256)
    logits = runner.prefill(cache, 0, [[1, 2, 3], [4, 5]])   # [2, vocab], at each row's last token
    logits = runner.decode(cache, torch.tensor([7, 9]), [3, 2])  # next tokens at columns 3 and 2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smedjan.infer import cpu_kernel
from smedjan.model.attention import Attention, causal_mask
from smedjan.model.ffn import SwiGLU
from smedjan.model.model import ModelState, Transformer


class KVCache:
    """Keys and values of past positions, preallocated: per layer [B, n_kv_heads, max_len, head_dim]."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len


@dataclass
class _Layer:
    # Shapes as [in, out]; stored as [out, in] when the CPU kernel is used (see Runner.mm).
    wqkv: torch.Tensor  # [dim, (H + 2 Hkv) hd]: norm gain, sqrt(dim) and (for Q) 1/sqrt(hd) folded in
    wo: torch.Tensor  # [H hd, dim]
    w13: torch.Tensor  # [dim, 2 ffn]: gate | up, norm gain and sqrt(dim) folded in
    w2: torch.Tensor  # [ffn, dim]
    window: int  # 0: the whole causal prefix


def fast_path_refusal(model: Transformer) -> str | None:
    """Why the fast path cannot run `model` (None when it can)."""
    if model.cfg.mup_base:
        return "µP's output multiplier and attention scale"
    if model.cfg.bitnet:  # its kernel runs full-precision weights; ModelRunner runs the quantised forward
        return "BitNet b1.58 (quantised linear layers)"
    for i, block in enumerate(model.layers):
        if type(block.mixer) is not Attention:
            return f"layer {i} mixes with {block.mixer.KIND}"
        if block.mixer.q_norm is not None:
            return "QK-norm"
        if type(block.ffn) is not SwiGLU:
            return f"layer {i}'s feed-forward is {block.ffn.KIND}"
    return None


class Runner:
    """Inference forward of a plain attention + SwiGLU `Transformer` (see the module
    docstring). The model's own parameters are not modified; the runner holds re-laid-out
    copies on `device`."""

    truncatable = True

    def __init__(self, model: Transformer, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_len: int | None = None):
        why = fast_path_refusal(model)
        assert why is None, f"the fast path does not run this model ({why}); use ModelRunner"
        cfg = self.cfg = model.cfg
        ref = model.tok_embeddings.weight
        self.device = torch.device(device) if device is not None else ref.device
        self.dtype = dtype or ref.dtype
        a = cfg.attention
        H, Hkv, hd, D = a.n_heads, a.n_kv_heads, a.head_dim, cfg.dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, hd
        self.shape = cpu_kernel.Shape(D, H, Hkv, hd, cfg.ffn.hidden)
        self.kernel = cpu_kernel.load() if self.device.type == "cpu" and self.dtype == torch.float32 else None
        # Fold in float64 (then round once) so folding adds no rounding of its own.
        f64 = torch.float64

        def put(t: torch.Tensor) -> torch.Tensor:
            # detach(): never the model's Parameter object itself, which model.to()/.double() mutate
            return t.detach().to(device=self.device, dtype=self.dtype).contiguous()

        def mat(w: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
            """A [out, in] weight (times a gain per input) in the layout `mm` expects."""
            w = w.to(f64) if gain is None else w.to(f64) * gain.to(f64)[None, :] * math.sqrt(D)
            return put(w if self.kernel is not None else w.T)

        with torch.no_grad():
            q_scale = 1.0 / math.sqrt(hd)
            self.layers: list[_Layer] = []
            for block in model.layers:
                m, f = block.mixer, block.ffn
                wqkv = torch.cat([m.wq.weight.to(f64) * q_scale, m.wk.weight, m.wv.weight])
                w13 = torch.cat([f.w1.weight, f.w3.weight])
                self.layers.append(_Layer(mat(wqkv, block.mixer_norm.weight), mat(m.wo.weight),
                                          mat(w13, block.ffn_norm.weight), mat(f.w2.weight), m.window))
            self.embedding = put(model.tok_embeddings.weight)
            self.head = mat(model.head_weight, model.norm.weight)
        # RMSNorm(x) @ W == (x * rsqrt(|x|^2 + dim * eps)) @ (sqrt(dim) * diag(g) W): only this sum remains.
        self.norm_eps = D * cfg.norm_eps
        self.ffn = cfg.ffn.hidden
        self.softcap = cfg.logit_softcap
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        rope_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        cos, sin = model.rope_tables.get(hd, self.max_len, self.device, rope_dtype)  # [>= max_len, hd]
        half = hd // 2
        # rotate_half(x) * sin == swap_halves(x) * [-sin, +sin]: a flip instead of slices and a cat.
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(sin)
        self.cos, self.sin = cos.contiguous(), (sin * sign).contiguous()
        if self.kernel is not None:  # the C decode step reads these tensors through raw pointers
            self._specs = [self.kernel.layer_spec(L.wqkv, L.wo, L.w13, L.w2, self.cos, self.sin, self.shape, L.window,
                                                  self.norm_eps) for L in self.layers]
            self._scratch = torch.empty(self.kernel.scratch_size(self.shape, cpu_kernel.MAX_ROWS))

    # ------------------------------------------------------------------ helpers
    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        n = max_len or self.max_len
        assert n <= self.max_len, (n, self.max_len)
        return KVCache(len(self.layers), self.n_kv_heads, self.head_dim, batch, n, self.device, self.dtype)

    def move_row(self, cache: KVCache, src: int, dst: int, length: int) -> None:
        for k, v in zip(cache.k, cache.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(|x|^2 + dim*eps): the part of RMSNorm not folded into the next matrix.
        Computed in at least float32 (bf16 sums of squares lose too much)."""
        if x.dtype in (torch.float32, torch.float64):
            return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(self.norm_eps).rsqrt_()
        xf = x.float()
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().add_(self.norm_eps).rsqrt_()
        return (xf * r).to(x.dtype)

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """qk: [..., n_heads, hd] (Q and K heads together); cos, sin: broadcastable
        [..., 1, hd]. Rotates in the tables' precision, like the model."""
        shape = qk.shape
        half = shape[-1] // 2
        x = qk.to(cos.dtype).view(*shape[:-1], 2, half)
        out = x * cos.view(*cos.shape[:-1], 2, half) + x.flip(-2) * sin.view(*sin.shape[:-1], 2, half)
        return out.view(shape).to(qk.dtype)

    def mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [..., in] times a stored weight: [..., out]."""
        if self.kernel is None:
            return x @ w
        if x.dim() == 2 and x.shape[0] <= cpu_kernel.MAX_ROWS:
            return self.kernel.gemv(w, x)
        return F.linear(x, w)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._softcap(self.mm(self._norm(x), self.head))

    def _softcap(self, z: torch.Tensor) -> torch.Tensor:
        if not self.softcap:
            return z
        return (torch.tanh(z.float() / self.softcap) * self.softcap).to(z.dtype)

    # ------------------------------------------------------------------ prefill
    def prefill(self, cache: KVCache, row: int, prompts: list[list[int]], start: int = 0) -> torch.Tensor:
        """Run `prompts` (token id lists, any lengths) through rows row..row+len(prompts)-1
        of `cache`, writing their keys/values at columns start..; rows already hold
        `start` columns of context (0 for a fresh sequence). Returns the logits after
        each prompt's last token, [len(prompts), vocab].

        Prompts are right-padded to the longest: a real token's causal attention never
        reaches the padding to its right, and the padding's cache columns are
        overwritten by the row's next tokens before anything reads them."""
        n, T = len(prompts), max(len(p) for p in prompts)
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, {start + T} requested")
        ids = torch.zeros((n, T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        nqk = (H + Hkv) * hd
        cos, sin = self.cos[start:start + T, None], self.sin[start:start + T, None]  # [T, 1, hd]
        q_pos = torch.arange(start, start + T, device=self.device)
        masks: dict[int, torch.Tensor | None] = {}
        x = self.embedding[ids]  # [n, T, dim]
        for i, L in enumerate(self.layers):
            if L.window not in masks:  # None: plain `is_causal` says it (a fresh prefill, no window)
                masks[L.window] = None if (start == 0 and L.window == 0) else causal_mask(q_pos, start + T, L.window)
            mask = masks[L.window]
            qkv = self.mm(self._norm(x), L.wqkv)  # [n, T, (H + 2 Hkv) hd]
            qk = self._rope(qkv[..., :nqk].view(n, T, H + Hkv, hd), cos, sin)
            q = qk[:, :, :H].transpose(1, 2)  # [n, H, T, hd]
            k = qk[:, :, H:].transpose(1, 2)  # [n, Hkv, T, hd]
            v = qkv[..., nqk:].view(n, T, Hkv, hd).transpose(1, 2)
            kc, vc = cache.k[i][row:row + n], cache.v[i][row:row + n]
            kc[:, :, start:start + T] = k
            vc[:, :, start:start + T] = v
            if start:
                k, v = kc[:, :, :start + T], vc[:, :, :start + T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=1.0, enable_gqa=H != Hkv)
            x = x + self.mm(y.transpose(1, 2).reshape(n, T, H * hd), L.wo)
            g = self.mm(self._norm(x), L.w13)
            x = x + self.mm(F.silu(g[..., :self.ffn]) * g[..., self.ffn:], L.w2)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self._logits(x[torch.arange(n, device=self.device), last])

    # ------------------------------------------------------------------- decode
    def decode(self, cache: KVCache, tokens: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """One step for rows 0..n-1: `tokens` [n] (on any device) go to columns `lens`
        (each row's current length). Returns next-token logits [n, vocab]."""
        n = len(lens)
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        nqk = (H + Hkv) * hd
        top = max(lens)
        if top >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, {top + 1} requested")
        if self.kernel is not None and n <= cpu_kernel.MAX_ROWS:
            # The whole step in C, one call per layer: no mask needed, each row attends to its own columns.
            x = self.embedding[tokens.cpu()]  # [n, dim], a fresh tensor the layers update in place
            pos = torch.tensor(lens, dtype=torch.int64)
            for spec, k, v in zip(self._specs, cache.k, cache.v):
                self.kernel.layer(spec, x, pos, k, v, self._scratch)
            return self._softcap(self.kernel.head(x, self.norm_eps, self.head, self._scratch))
        same = min(lens) == top
        if same:
            pos = top
            cos, sin = self.cos[pos], self.sin[pos]  # [hd]
        else:
            cols = torch.tensor(lens, device=self.device)  # [n]
            rows = torch.arange(n, device=self.device)
            cos, sin = self.cos[cols, None], self.sin[cols, None]  # [n, 1, hd]
        spans: dict[int, tuple[int, torch.Tensor | None]] = {}

        def span(window: int) -> tuple[int, torch.Tensor | None]:
            """(first column, mask [n, 1, 1, S] or None) of a layer with this window."""
            if window not in spans:
                if same:  # every row at the same column: slice reads; a window is a narrower slice
                    spans[window] = (max(0, pos + 1 - window) if window else 0, None)
                else:
                    lo = max(0, min(lens) + 1 - window) if window else 0
                    cols_s = torch.arange(lo, top + 1, device=self.device)
                    keep = cols_s[None, :] <= cols[:, None]  # [n, S]: row r sees its own columns only
                    if window:
                        keep &= cols_s[None, :] > cols[:, None] - window
                    spans[window] = (lo, keep[:, None, None, :])
            return spans[window]

        x = self.embedding[tokens.to(self.device)]  # [n, dim]
        for i, L in enumerate(self.layers):
            lo, mask = span(L.window)
            qkv = self.mm(self._norm(x), L.wqkv)  # [n, (H + 2 Hkv) hd]
            qk = self._rope(qkv[:, :nqk].view(n, H + Hkv, hd), cos, sin)
            v = qkv[:, nqk:].view(n, Hkv, hd)
            kc, vc = cache.k[i], cache.v[i]
            if same:
                kc[:n, :, pos] = qk[:, H:]
                vc[:n, :, pos] = v
            else:
                kc[rows, :, cols] = qk[:, H:]
                vc[rows, :, cols] = v
            y = F.scaled_dot_product_attention(qk[:, :H, None], kc[:n, :, lo:top + 1], vc[:n, :, lo:top + 1],
                                               attn_mask=mask, scale=1.0, enable_gqa=H != Hkv)  # [n, H, 1, hd]
            x = x + self.mm(y.view(n, H * hd), L.wo)
            g = self.mm(self._norm(x), L.w13)
            x = x + self.mm(F.silu(g[:, :self.ffn]) * g[:, self.ffn:], L.w2)
        return self._logits(x)


class ModelRunner:
    """Decoding through the model's own forward with per-layer state: every architecture.
    Prompts are prefilled one at a time at their exact lengths (a recurrent state must
    not see padding); decode steps run all rows together at their own positions."""

    def __init__(self, model: Transformer, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_len: int | None = None):
        self.model = model
        ref = model.tok_embeddings.weight
        self.device = torch.device(device) if device is not None else ref.device
        self.dtype = dtype or ref.dtype
        if self.device != ref.device or self.dtype != ref.dtype:
            self.model = model = model.to(device=self.device, dtype=self.dtype)
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.truncatable = all(block.mixer.TRUNCATABLE for block in model.layers)

    def new_cache(self, batch: int, max_len: int | None = None) -> ModelState:
        return self.model.new_state(batch, max_len or self.max_len, self.device, self.dtype)

    def move_row(self, cache: ModelState, src: int, dst: int, length: int) -> None:
        cache.move_row(src, dst, length)

    def prefill(self, cache: ModelState, row: int, prompts: list[list[int]], start: int = 0) -> torch.Tensor:
        out = []
        for r, p in enumerate(prompts):
            ids = torch.tensor([p], dtype=torch.long, device=self.device)
            out.append(self.model(ids, state=cache, start=start, rows=slice(row + r, row + r + 1))[0, -1])
        return torch.stack(out)

    def decode(self, cache: ModelState, tokens: torch.Tensor, lens: list[int]) -> torch.Tensor:
        n = len(lens)
        ids = tokens.to(self.device)[:, None]
        if min(lens) == max(lens):
            start: int | torch.Tensor = lens[0]
        else:
            start = torch.tensor(lens, device=self.device)
        return self.model(ids, state=cache, start=start, rows=slice(0, n))[:, -1]


def runner_for(model: Transformer, device=None, dtype=None, max_len: int | None = None, path: str = "auto"):
    """The fast path when it runs this model (and `path` allows), else the model's own."""
    if path == "fast" or (path == "auto" and fast_path_refusal(model) is None):
        return Runner(model, device, dtype, max_len)
    return ModelRunner(model, device, dtype, max_len)
