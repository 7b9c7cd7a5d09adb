"""Grow a trained model into a larger architecture that computes the same function at step 0.

Width (dim d -> d'): the residual stream gets d' - d new dimensions that start at zero and
stay zero at step 0, because everything that writes into the stream writes zero there
(the embedding's new columns, the new rows of every `wo` and `w2`). Everything that reads
the stream (wq/wk/wv, w1/w3, an untied head) gets small random weights on the new
dimensions, which read zeros, so gradients reach them and the new capacity trains.
RMSNorm is the one catch: with zeros appended, mean(x'^2) = (d/d') mean(x^2), which would
rescale every normalised value. Setting the grown model's norm_eps to eps * d/d' makes
rsqrt(mean(x'^2) + eps') = sqrt(d'/d) * rsqrt(mean(x^2) + eps) exactly, and every norm gain
is multiplied by sqrt(d/d') to cancel that factor. (The new config records the new eps.)

Heads (same head_dim): old query heads keep their weights; new heads get random q/k/v
rows and zero columns in `wo`, so they add nothing at step 0. With grouped-query attention
(G query heads per key/value head) old kv head j goes to slot j and its G query heads to
the first G slots of group j; the new group size must be >= the old one.
FFN (hidden f -> f'): new hidden units get random w1/w3 rows and zero w2 columns.
Depth (L -> L' layers): the old layers keep their order at positions floor(l * L'/L); each
new layer is a copy of the old layer before it with `wo` and `w2` zeroed, so it adds
nothing to the residual stream at step 0 (an identity block) but starts with trained
attention and FFN inputs.

Not exactly function-preserving, hence refused: a smaller size in any dimension, another
head_dim (the attention scale 1/sqrt(head_dim) and the RoPE frequencies change), a smaller
group size, other RoPE frequencies, vocabulary, tying or sliding window.

    dst_cfg = grown_config(src_cfg, size="medium")
    state = grow_state(src_state, src_cfg, dst_cfg, seed=0)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from smedjan.errors import UserError
from smedjan.model.config import PRESETS, ModelConfig, ffn_hidden_for

INIT_STD = 0.02  # the GPT-2 init of Transformer.reset_parameters, for the new readers' weights


def grown_config(src: ModelConfig, size: str | None = None, dim: int | None = None, layers: int | None = None,
                 heads: int | None = None, ffn_mult: float | None = None, kv_heads: int | None = None,
                 max_seq_len: int | None = None) -> ModelConfig:
    """The target config: a preset's shape, or custom dims (unset ones keep the source's);
    everything else (vocabulary, RoPE, tying) from the source; norm_eps scaled by d/d'."""
    if size is None:
        size = "custom"
    if size != "custom":
        if size not in PRESETS:
            raise UserError(f"unknown size {size!r}; presets: {', '.join(PRESETS)} (or custom)")
        given = [f"--{n}" for n, v in (("dim", dim), ("layers", layers), ("heads", heads)) if v is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply to --size custom (--size {size} is a preset)")
        dim, layers, heads = PRESETS[size]
    dim = src.dim if dim is None else dim
    layers = src.n_layers if layers is None else layers
    heads = src.n_heads if heads is None else heads
    for name, v in (("--dim", dim), ("--layers", layers), ("--heads", heads)):
        if v <= 0:
            raise UserError(f"{name} {v} must be positive")
    if dim % heads:
        raise UserError(f"--dim {dim} is not divisible by --heads {heads}")
    if kv_heads is None:
        group = src.n_heads // src.n_kv_heads
        if heads % group:
            raise UserError(f"{heads} heads cannot keep the source's {group} query heads per key/value head; "
                            "give --kv-heads")
        kv_heads = heads // group
    if ffn_mult is not None:
        ffn_hidden = ffn_hidden_for(dim, ffn_mult)
    elif dim == src.dim:
        ffn_hidden = src.ffn_hidden
    else:
        ffn_hidden = ffn_hidden_for(dim)
    # Unknown future fields stay as in the source; the shape fields and eps are replaced.
    return dataclasses.replace(
        src, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=dim // heads,
        ffn_hidden=ffn_hidden, max_seq_len=max_seq_len or src.max_seq_len, norm_eps=src.norm_eps * src.dim / dim,
        preset=size)


def check_growable(src: ModelConfig, dst: ModelConfig) -> None:
    """UserError naming the first difference that no exact expansion can bridge."""
    from smedjan.model.model import rope_frequencies

    for name, a, b in (("dim", src.dim, dst.dim), ("layers", src.n_layers, dst.n_layers),
                       ("heads", src.n_heads, dst.n_heads), ("kv heads", src.n_kv_heads, dst.n_kv_heads),
                       ("FFN hidden size", src.ffn_hidden, dst.ffn_hidden),
                       ("context (max_seq_len)", src.max_seq_len, dst.max_seq_len)):
        if b < a:
            raise UserError(f"cannot grow to a smaller model: {name} {a} -> {b}")
    if src.head_dim != dst.head_dim or src.dim != src.n_heads * src.head_dim:
        raise UserError(f"head dim {src.head_dim} -> {dst.head_dim}: the attention scale and RoPE frequencies would "
                        f"change, so no expansion is exact; keep dim / heads = {src.head_dim} (e.g. --size custom "
                        f"--dim {dst.dim} --heads {max(1, dst.dim // src.head_dim)})")
    g_src, g_dst = src.n_heads // src.n_kv_heads, dst.n_heads // dst.n_kv_heads
    if g_dst < g_src:
        raise UserError(f"query heads per key/value head {g_src} -> {g_dst}: heads that share keys now cannot be "
                        f"separated exactly; use --kv-heads {dst.n_heads // g_src}")
    for f in ("vocab_size", "tie_embeddings", "sliding_window"):
        if getattr(src, f) != getattr(dst, f):
            raise UserError(f"{f} {getattr(src, f)} -> {getattr(dst, f)} cannot change when growing")
    fs, fd = rope_frequencies(src), rope_frequencies(dst)
    if fs[1] != fd[1] or not torch.equal(fs[0], fd[0]):
        raise UserError("the RoPE frequencies would change (rope settings or context); grow keeps them")
    if (dst.dim, dst.n_layers, dst.n_heads, dst.n_kv_heads, dst.ffn_hidden, dst.max_seq_len) == (
            src.dim, src.n_layers, src.n_heads, src.n_kv_heads, src.ffn_hidden, src.max_seq_len):
        raise UserError(f"the model already has that shape (dim {src.dim}, {src.n_layers} layers, {src.n_heads} "
                        f"heads, FFN {src.ffn_hidden}); nothing to grow")


def layer_positions(n_src: int, n_dst: int) -> list[int]:
    """Where each old layer goes: floor(l * n_dst / n_src), strictly increasing."""
    return [l * n_dst // n_src for l in range(n_src)]


def grow_state(state: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """The grown model's state dict (see the module docstring), in the source's dtype."""
    check_growable(src, dst)
    gen = torch.Generator().manual_seed(seed)
    d, d2 = src.dim, dst.dim
    hd = src.head_dim
    scale = math.sqrt(d / d2)  # norm gain factor that cancels the zero-padded RMS change
    dtype = state["tok_embeddings.weight"].dtype

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * INIT_STD

    def norm(g):  # [d] -> [d']: old gains scaled, new ones the scaled mean gain (they read zeros)
        g = g.double()
        return torch.cat([g * scale, torch.full((d2 - d,), float(g.mean()) * scale, dtype=torch.float64)])

    # Query head i (kv head i // g_src, index i % g_src in its group) -> slot (i // g_src) * g_dst + i % g_src.
    g_src, g_dst = src.n_heads // src.n_kv_heads, dst.n_heads // dst.n_kv_heads
    q_slot = [(i // g_src) * g_dst + i % g_src for i in range(src.n_heads)]
    kv_slot = list(range(src.n_kv_heads))

    def readers(w, slots, n_out):  # wq/wk/wv [heads*hd, d] -> [n_out*hd, d'], random elsewhere
        out = rand(n_out * hd, d2)
        w = w.double()
        for i, s in enumerate(slots):
            out[s * hd:(s + 1) * hd, :d] = w[i * hd:(i + 1) * hd]
        return out

    def grow_layer(p: str) -> dict[str, torch.Tensor]:
        t = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        wo = torch.zeros(d2, dst.n_heads * hd, dtype=torch.float64)
        for i, s in enumerate(q_slot):
            wo[:d, s * hd:(s + 1) * hd] = t["attention.wo.weight"][:, i * hd:(i + 1) * hd].double()
        w1, w3 = rand(dst.ffn_hidden, d2), rand(dst.ffn_hidden, d2)
        w1[:src.ffn_hidden, :d] = t["feed_forward.w1.weight"].double()
        w3[:src.ffn_hidden, :d] = t["feed_forward.w3.weight"].double()
        w2 = torch.zeros(d2, dst.ffn_hidden, dtype=torch.float64)
        w2[:d, :src.ffn_hidden] = t["feed_forward.w2.weight"].double()
        return {
            "attention_norm.weight": norm(t["attention_norm.weight"]),
            "attention.wq.weight": readers(t["attention.wq.weight"], q_slot, dst.n_heads),
            "attention.wk.weight": readers(t["attention.wk.weight"], kv_slot, dst.n_kv_heads),
            "attention.wv.weight": readers(t["attention.wv.weight"], kv_slot, dst.n_kv_heads),
            "attention.wo.weight": wo,
            "ffn_norm.weight": norm(t["ffn_norm.weight"]),
            "feed_forward.w1.weight": w1, "feed_forward.w3.weight": w3, "feed_forward.w2.weight": w2,
        }

    out: dict[str, torch.Tensor] = {}
    emb = torch.zeros(dst.vocab_size, d2, dtype=torch.float64)
    emb[:, :d] = state["tok_embeddings.weight"].double()
    out["tok_embeddings.weight"] = emb
    out["norm.weight"] = norm(state["norm.weight"])
    if "output.weight" in state:
        head = rand(dst.vocab_size, d2)
        head[:, :d] = state["output.weight"].double()
        out["output.weight"] = head
    grown = [grow_layer(f"layers.{l}.") for l in range(src.n_layers)]
    pos = layer_positions(src.n_layers, dst.n_layers)
    src_at = {p: l for l, p in enumerate(pos)}
    last = 0
    for j in range(dst.n_layers):
        if j in src_at:
            last = src_at[j]
            layer = grown[last]
        else:  # an identity block: the previous old layer's readers, zero writers
            layer = {k: v.clone() for k, v in grown[last].items()}
            layer["attention.wo.weight"].zero_()
            layer["feed_forward.w2.weight"].zero_()
        out.update({f"layers.{j}.{k}": v for k, v in layer.items()})
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def grow_checkpoint(path: str, output: str, *, size: str | None = None, dim: int | None = None,
                    layers: int | None = None, heads: int | None = None, ffn_mult: float | None = None,
                    kv_heads: int | None = None, max_seq_len: int | None = None, seed: int = 0) -> dict:
    """Read `path`, write the grown model to `output` (atomically); returns the summary."""
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import load_checkpoint, save_checkpoint
    from smedjan.io import check_output_path
    from smedjan.model.load import checked_model_state

    check_output_path(output)
    ck = load_checkpoint(path)
    src = ck.config
    state = checked_model_state(ck)
    dst = grown_config(src, size, dim, layers, heads, ffn_mult, kv_heads, max_seq_len)
    try:
        check_growable(src, dst)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    state = grow_state(state, src, dst, seed)
    tok = ck.tokenizer if "smedjan.tokenizer" in ck.tensors else None
    save_checkpoint(output, state, kind=C.KIND_MODEL, config=dst, tokenizer=tok,
                    meta={"tool": "grow", "grown_from": str(path), "source_config": src.to_dict(), "seed": seed})
    return {"output": str(output), "source": str(path), "dim": f"{src.dim} -> {dst.dim}",
            "layers": f"{src.n_layers} -> {dst.n_layers}", "heads": f"{src.n_heads} -> {dst.n_heads}",
            "kv_heads": f"{src.n_kv_heads} -> {dst.n_kv_heads}", "ffn_hidden": f"{src.ffn_hidden} -> {dst.ffn_hidden}",
            "norm_eps": dst.norm_eps, "params": f"{src.n_params():,} -> {dst.n_params():,}",
            "preset": dst.preset}
