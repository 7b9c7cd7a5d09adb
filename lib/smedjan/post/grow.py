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

Each part grows its own tensors (`grow` on the part's class: attention, SwiGLU and ReLU^2
can; another part is refused with one line naming it); this module grows the embedding,
head and norms, places the layers, and makes the identity blocks (a part's `WRITERS`, the
projections into the residual stream, zeroed).

Not exactly function-preserving, hence refused: a smaller size in any dimension, another
head_dim (the attention scale 1/sqrt(head_dim) and the RoPE frequencies change), a smaller
group size, other RoPE frequencies, vocabulary, tying or sliding window.

    dst_cfg = grown_config(src_cfg, size="medium")
    state = grow_state(src_state, src_cfg, dst_cfg, seed=0)
"""

from __future__ import annotations

import torch

from smedjan.errors import UserError
from smedjan.model.config import PRESETS, ModelConfig, ffn_hidden_for
from smedjan.model.ffn import DEFAULT_MULT
from smedjan.model.parts import Growth
from smedjan.model.registry import FEED_FORWARDS, MIXERS


def grown_config(src: ModelConfig, size: str | None = None, dim: int | None = None, layers: int | None = None,
                 heads: int | None = None, ffn_mult: float | None = None, kv_heads: int | None = None,
                 max_seq_len: int | None = None) -> ModelConfig:
    """The target config: a preset's shape, or custom dims (unset ones keep the source's);
    everything else (vocabulary, RoPE, tying, parts) from the source; norm_eps scaled by d/d'."""
    a = src.attention
    if src.shared_layers > 1:  # its layers are one block: new layers would have to be copies too
        raise UserError(f"a model with --shared-layers {src.shared_layers} cannot be grown")
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
    heads = a.n_heads if heads is None else heads
    for name, v in (("--dim", dim), ("--layers", layers), ("--heads", heads)):
        if v <= 0:
            raise UserError(f"{name} {v} must be positive")
    if dim % heads:
        raise UserError(f"--dim {dim} is not divisible by --heads {heads}")
    if kv_heads is None:
        group = a.n_heads // a.n_kv_heads
        if heads % group:
            raise UserError(f"{heads} heads cannot keep the source's {group} query heads per key/value head; "
                            "give --kv-heads")
        kv_heads = heads // group
    if ffn_mult is not None:
        ffn_hidden = ffn_hidden_for(dim, ffn_mult)
    elif dim == src.dim:
        ffn_hidden = src.ffn.hidden
    else:
        ffn_hidden = ffn_hidden_for(dim, DEFAULT_MULT[src.ffn.kind])  # the kind's default width
    if layers != src.n_layers and src.layer_pattern:
        raise UserError(f"--layers {layers}: a model with a layer pattern ({src.layer_pattern!r}) keeps its depth "
                        "when grown")
    return src.replace(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=dim // heads,
                       ffn_hidden=ffn_hidden, max_seq_len=max_seq_len or src.max_seq_len,
                       norm_eps=src.norm_eps * src.dim / dim, preset=size)


def check_growable(src: ModelConfig, dst: ModelConfig) -> None:
    """UserError naming the first difference that no exact expansion can bridge."""
    for name, a, b in (("dim", src.dim, dst.dim), ("layers", src.n_layers, dst.n_layers),
                       ("context (max_seq_len)", src.max_seq_len, dst.max_seq_len)):
        if b < a:
            raise UserError(f"cannot grow to a smaller model: {name} {a} -> {b}")
    if src.mup_base:
        raise UserError(f"a µP model (mup_base {src.mup_base}) cannot grow exactly: its output multiplier "
                        "base/dim changes with the width")
    for f in ("vocab_size", "tie_embeddings", "logit_softcap"):
        if getattr(src, f) != getattr(dst, f):
            raise UserError(f"{f} {getattr(src, f)} -> {getattr(dst, f)} cannot change when growing")
    if src.ffn.kind != dst.ffn.kind or set(src.layer_mixers()) != set(dst.layer_mixers()):
        raise UserError("the parts (mixers, feed-forward) cannot change when growing")
    for kind in sorted(set(src.layer_mixers())):
        MIXERS[kind].check_growable(src, dst)
    FEED_FORWARDS[src.ffn.kind].check_growable(src, dst)
    if src.to_dict() == dst.replace(norm_eps=src.norm_eps, preset=src.preset).to_dict():
        raise UserError(f"the model already has that shape (dim {src.dim}, {src.n_layers} layers, "
                        f"{src.attention.n_heads} heads, FFN {src.ffn.hidden}); nothing to grow")


def layer_positions(n_src: int, n_dst: int) -> list[int]:
    """Where each old layer goes: floor(l * n_dst / n_src), strictly increasing."""
    return [l * n_dst // n_src for l in range(n_src)]


def grow_state(state: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """The grown model's state dict (see the module docstring), in the source's dtype."""
    check_growable(src, dst)
    g = Growth(src, dst, torch.Generator().manual_seed(seed))
    d, d2 = src.dim, dst.dim
    dtype = state["tok_embeddings.weight"].dtype
    mixers = src.layer_mixers()
    mixer_cls, ffn_cls = [MIXERS[m] for m in mixers], FEED_FORWARDS[src.ffn.kind]

    def grow_layer(l: int) -> dict[str, torch.Tensor]:
        p = f"layers.{l}."
        t = {k[len(p):]: v.double() for k, v in state.items() if k.startswith(p)}

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}

        out = {"mixer_norm.weight": g.norm(t["mixer_norm.weight"]), "ffn_norm.weight": g.norm(t["ffn_norm.weight"])}
        out.update({"mixer." + k: v for k, v in mixer_cls[l].grow(part("mixer."), g).items()})
        out.update({"ffn." + k: v for k, v in ffn_cls.grow(part("ffn."), g).items()})
        return out

    out: dict[str, torch.Tensor] = {}
    emb = torch.zeros(dst.vocab_size, d2, dtype=torch.float64)
    emb[:, :d] = state["tok_embeddings.weight"].double()
    out["tok_embeddings.weight"] = emb
    out["norm.weight"] = g.norm(state["norm.weight"])
    if "output.weight" in state:
        head = g.rand(dst.vocab_size, d2)
        head[:, :d] = state["output.weight"].double()
        out["output.weight"] = head
    grown = [grow_layer(l) for l in range(src.n_layers)]
    pos = layer_positions(src.n_layers, dst.n_layers)
    src_at = {p: l for l, p in enumerate(pos)}
    last = 0
    for j in range(dst.n_layers):
        if j in src_at:
            last = src_at[j]
            layer = grown[last]
        else:  # an identity block: the previous old layer's readers, zero writers
            layer = {k: v.clone() for k, v in grown[last].items()}
            for w in mixer_cls[last].WRITERS:
                layer["mixer." + w].zero_()
            for w in ffn_cls.WRITERS:
                layer["ffn." + w].zero_()
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
    from smedjan.model.mtp import without_mtp

    check_output_path(output)
    ck = load_checkpoint(path)
    src = ck.config
    state = checked_model_state(ck)
    src, state = without_mtp(src, state)  # the grown model has no MTP modules (--init --n-predict adds new ones)
    dst = grown_config(src, size, dim, layers, heads, ffn_mult, kv_heads, max_seq_len)
    try:
        check_growable(src, dst)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    state = grow_state(state, src, dst, seed)
    tok = ck.tokenizer if "smedjan.tokenizer" in ck.tensors else None
    save_checkpoint(output, state, kind=C.KIND_MODEL, config=dst, tokenizer=tok,
                    meta={"tool": "grow", "grown_from": str(path), "source_config": src.to_dict(), "seed": seed})
    sa, da = src.attention, dst.attention
    return {"output": str(output), "source": str(path), "dim": f"{src.dim} -> {dst.dim}",
            "layers": f"{src.n_layers} -> {dst.n_layers}", "heads": f"{sa.n_heads} -> {da.n_heads}",
            "kv_heads": f"{sa.n_kv_heads} -> {da.n_kv_heads}", "ffn_hidden": f"{src.ffn.hidden} -> {dst.ffn.hidden}",
            "norm_eps": dst.norm_eps, "params": f"{src.n_params():,} -> {dst.n_params():,}",
            "preset": dst.preset}
