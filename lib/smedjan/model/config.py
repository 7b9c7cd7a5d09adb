"""The model's one config dataclass (a nested config per part kind) and the preset table.

    cfg = ModelConfig.from_preset("small", vocab_size=8192)          # 7.2M parameters
    cfg = ModelConfig.from_depth(8192, depth=12)                     # nanochat's dial: dim 768, 6 heads
    cfg = ModelConfig.make(vocab_size=8192, dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, qk_norm=True)
    cfg.attention.n_heads, cfg.ffn.hidden, cfg.layer_mixers()        # 16, 2816, ['attention'] * 16

`make` and `replace` take flat keyword names (`n_heads`, `rope_theta`, `mlp`, ...: the
table FLAT) and route them to the nested configs; checkpoints of the first release,
whose config was flat, load through the same table. Every config read from a file is
checked (types, bounds, consistency) before anything is allocated.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from smedjan.errors import UserError
from smedjan.model.attention import AttentionConfig
from smedjan.model.block_sparse import BlockSparseConfig
from smedjan.model.ffn import FFN_MULTIPLE, FFNConfig, ffn_hidden_for
from smedjan.model.linear_attention import LinearAttnConfig
from smedjan.model.mamba2 import SSMConfig
from smedjan.model.mla import MLAConfig
from smedjan.model.moe import MoEConfig
from smedjan.model.mtp import MTPConfig
from smedjan.model.parts import check
from smedjan.model.rope import SCALINGS as ROPE_SCALINGS
from smedjan.model.rwkv7 import RWKVConfig
from smedjan.model.rope import RopeConfig

__all__ = ["ModelConfig", "PRESETS", "FLAT", "ffn_hidden_for", "FFN_MULTIPLE", "ROPE_SCALINGS"]

# name -> (dim, n_layers, n_heads). At vocab 8192 (SwiGLU 8/3 x dim rounded up to 256):
# tiny 2.1M, small 7.2M, medium 45M, large 317M, max 6.5B parameters.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "small": (256, 6, 4),
    "medium": (512, 12, 8),
    "large": (1024, 24, 16),
    "max": (4096, 32, 32),
}

# Flat keyword -> (nested config, its field); None: a ModelConfig field of the same name.
FLAT: dict[str, tuple[str, str] | None] = {
    "n_heads": ("attention", "n_heads"), "n_kv_heads": ("attention", "n_kv_heads"),
    "head_dim": ("attention", "head_dim"), "qk_norm": ("attention", "qk_norm"),
    "sliding_window": ("attention", "sliding_window"), "window_pattern": ("attention", "window_pattern"),
    "short_window": ("attention", "short_window"),
    "mlp": ("ffn", "kind"), "ffn_hidden": ("ffn", "hidden"),
    "rope_theta": ("rope", "theta"), "rope_scaling": ("rope", "scaling"), "rope_factor": ("rope", "factor"),
    "rope_original_max_seq_len": ("rope", "original_max_seq_len"),
    "rope_low_freq_factor": ("rope", "low_freq_factor"), "rope_high_freq_factor": ("rope", "high_freq_factor"),
    "yarn_beta_fast": ("rope", "beta_fast"), "yarn_beta_slow": ("rope", "beta_slow"),
    "mla_latent_dim": ("mla", "latent_dim"), "mla_q_latent_dim": ("mla", "q_latent_dim"),
    "mla_rope_dim": ("mla", "rope_dim"),
    "block_sparse_top_k": ("block_sparse", "top_k"), "block_size": ("block_sparse", "block_size"),
    "ssm_state": ("ssm", "state"), "ssm_expand": ("ssm", "expand"), "ssm_head_dim": ("ssm", "head_dim"),
    "ssm_chunk": ("ssm", "chunk"), "linear_attn_chunk": ("linear_attn", "chunk"),
    "rwkv_head_dim": ("rwkv", "head_dim"), "rwkv_chunk": ("rwkv", "chunk"),
    # Mixture-of-Experts
    "n_experts": ("moe", "n_experts"), "top_k_experts": ("moe", "top_k"), "shared_experts": ("moe", "shared"),
    "moe_capacity": ("moe", "capacity"), "moe_aux_loss": ("moe", "aux_loss"), "z_loss": ("moe", "z_loss"),
    # multi-token prediction
    "n_predict": ("mtp", "n_predict"),
}

_NESTED = {"attention": AttentionConfig, "mla": MLAConfig, "block_sparse": BlockSparseConfig, "ffn": FFNConfig,
           "rope": RopeConfig, "ssm": SSMConfig, "linear_attn": LinearAttnConfig, "rwkv": RWKVConfig,
           "moe": MoEConfig, "mtp": MTPConfig}
MAX_DIM, MAX_LAYERS, MAX_VOCAB, MAX_CONTEXT = 1 << 16, 1024, 1 << 24, 1 << 24


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int = 256
    n_layers: int = 6
    max_seq_len: int = 2048  # the longest context RoPE serves
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    logit_softcap: float = 0.0  # 0: off; else logits = c * tanh(logits / c) (Gemma 2, nanochat)
    mixer: str = "attention"  # a MIXERS name, for every layer unless layer_pattern says otherwise
    # Comma-separated mixer names tiled across the layers, `name*N` repeating one:
    # "attention*3,mla" is 3 attention layers then an MLA layer, over and over.
    layer_pattern: str = ""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    block_sparse: BlockSparseConfig = field(default_factory=BlockSparseConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    linear_attn: LinearAttnConfig = field(default_factory=LinearAttnConfig)
    rwkv: RWKVConfig = field(default_factory=RWKVConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Block-wise weight sharing: consecutive groups of this many layers run one block's
    # weights (1: none; smedjan.model.sharing).
    shared_layers: int = 1
    # µP (smedjan.model.mup): the base width the rates were tuned at (0: off, the standard
    # parametrisation); sets the readout multiplier, the attention scale and the init.
    mup_base: int = 0
    mtp: MTPConfig = field(default_factory=MTPConfig)  # multi-token prediction modules (--n-predict)
    # BitNet b1.58: ternary weights and 8-bit activations in every block linear
    # (smedjan.model.bitnet); embedding and head full precision.
    bitnet: bool = False
    preset: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Own copies: dataclasses.replace() shares nested objects, and resolve() fills them in.
        for name in _NESTED:
            setattr(self, name, copy.deepcopy(getattr(self, name)))
        if isinstance(self.extra, dict):  # else validate() names the field
            self.extra = dict(self.extra)
        self.validate()

    def validate(self) -> None:
        """Types and bounds of every field, then the parts' own checks; fills the
        derived defaults (kv heads, head dim, FFN width, MLA widths)."""
        _check_types(self, "model config")
        for name in _NESTED:
            _check_types(getattr(self, name), f"model config {name}")
        check([
            (1 <= self.vocab_size <= MAX_VOCAB, f"vocab size {self.vocab_size} must be in [1, {MAX_VOCAB}]"),
            (1 <= self.dim <= MAX_DIM, f"--dim {self.dim} must be in [1, {MAX_DIM}]"),
            (1 <= self.n_layers <= MAX_LAYERS, f"--layers {self.n_layers} must be in [1, {MAX_LAYERS}]"),
            (1 <= self.max_seq_len <= MAX_CONTEXT, f"max_seq_len {self.max_seq_len} must be in [1, {MAX_CONTEXT}]"),
            (0 < self.norm_eps < 1, f"norm_eps {self.norm_eps} must be in (0, 1)"),
            (0 <= self.logit_softcap <= 1e4, f"--logit-softcap {self.logit_softcap} must be in [0, 10000] (0: off)"),
        ])
        self.attention.resolve(self.dim)
        check(self.attention.validate(self.dim, self.max_seq_len))
        self.ffn.resolve(self.dim)
        check(self.ffn.validate())
        check(self.rope.validate())
        self.mla.resolve(self.attention.head_dim)
        check(self.mla.validate(self.dim, self.attention.n_heads, self.attention.n_kv_heads))
        check(self.block_sparse.validate(self.max_seq_len))
        check(self.moe.validate(self.ffn.kind))
        mixers = self.layer_mixers()
        self.rwkv.resolve(self.dim)
        for kind, checks in (("ssm", self.ssm.validate(self.dim)), ("linear_attn", self.linear_attn.validate()),
                             ("rwkv", self.rwkv.validate(self.dim))):
            if kind in mixers:  # the defaults need not fit a model that does not use the part
                check(checks)
        from smedjan.model.registry import MIXERS

        check(self.mtp.validate(mixers))
        unknown = [m for m in mixers if m not in MIXERS]
        check([(not unknown, f"mixer {unknown[0] if unknown else ''!r} is not one of {', '.join(MIXERS)}"),
               ("mla" not in mixers or self.mla.latent_dim > 0, "the mla mixer needs --mla-latent-dim"),
               ("block_sparse" not in mixers or self.block_sparse.top_k > 0,
                "the block_sparse mixer needs --block-sparse-top-k"),
               (self.ffn.kind != "rwkv" or set(mixers) == {"rwkv"},
                "--mlp rwkv (RWKV-7's channel mixing) keeps its token shift in the rwkv layer's state: every layer "
                "must be rwkv (hybrids take --mlp swiglu or relu2)")])
        from smedjan.model import sharing

        check(sharing.checks(self))
        from smedjan.model import mup

        check(mup.checks(self))
        if self.mup_base:  # derived: the attention part reads its scale from its own config
            self.attention.scale = mup.attention_scale(self)
        from smedjan.model import bitnet

        check(bitnet.checks(self))

    # ------------------------------------------------------------------ layers
    def layer_mixers(self) -> list[str]:
        """The mixer of every layer: `layer_pattern` tiled, else `mixer` everywhere."""
        if not self.layer_pattern:
            return [self.mixer] * self.n_layers
        tokens = parse_pattern(self.layer_pattern)
        if len(tokens) > self.n_layers:
            raise UserError(f"--layer-pattern {self.layer_pattern!r} names {len(tokens)} layers, more than the "
                            f"model's {self.n_layers}")
        return [tokens[i % len(tokens)] for i in range(self.n_layers)]

    def window(self, layer: int) -> int:
        """The attention window of `layer` (0: the whole causal prefix)."""
        return self.attention.window(layer, self.n_layers, self.max_seq_len)

    # ------------------------------------------------------------------ builders
    @classmethod
    def make(cls, vocab_size: int, **flat) -> "ModelConfig":
        """A config from flat keywords (FLAT's names and ModelConfig's own fields);
        `ffn_mult` sets the FFN width as a multiple of dim (rounded up to 256)."""
        top, nested = _route(flat)
        return cls(vocab_size=vocab_size, **top, **{k: _NESTED[k](**v) for k, v in nested.items()})

    def replace(self, **flat) -> "ModelConfig":
        """A copy with some fields changed (flat keywords, as `make`); derived widths
        (head dim, FFN hidden) stay as they are unless given."""
        d = self.to_dict()
        top, nested = _route(flat, dim=flat.get("dim", self.dim))
        d.update(top)
        for k, v in nested.items():
            d[k].update(v)
        return ModelConfig.from_dict(d)

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **flat) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown size {name!r}; presets: {', '.join(PRESETS)} (or custom)")
        dim, n_layers, n_heads = PRESETS[name]
        return cls.make(vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, preset=name, **flat)

    @classmethod
    def custom(cls, vocab_size: int, dim: int, n_layers: int, n_heads: int, ffn_mult: float | None = None,
               **flat) -> "ModelConfig":
        return cls.make(vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_mult=ffn_mult, preset="custom",
                        **flat)

    @classmethod
    def from_depth(cls, vocab_size: int, depth: int, aspect_ratio: int = 64, head_dim: int = 128,
                   **flat) -> "ModelConfig":
        """nanochat's dial: depth layers, dim = depth x aspect_ratio rounded up to a multiple
        of head_dim, heads = dim / head_dim."""
        check([(1 <= depth <= MAX_LAYERS, f"--depth {depth} must be in [1, {MAX_LAYERS}]"),
               (1 <= aspect_ratio <= MAX_DIM, f"--aspect-ratio {aspect_ratio} must be in [1, {MAX_DIM}]"),
               (2 <= head_dim <= 1024 and head_dim % 2 == 0, f"--head-dim {head_dim} must be even and in [2, 1024]")])
        dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        return cls.make(vocab_size, dim=dim, n_layers=depth, n_heads=dim // head_dim, head_dim=head_dim,
                        preset=f"d{depth}", **flat)

    # ------------------------------------------------------------- derived facts
    def n_params(self, embedding: bool = True) -> int:
        """Exact parameter count (the tied head counts once); without embedding, the
        embedding and an untied head are left out."""
        return _counts(self.to_json())[0 if embedding else 1]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), summed over the parts: 6 x each
        matmul weight, plus attention's 12 x heads x head_dim x keys per layer, plus the
        output head (6 x vocab x dim); the embedding lookup is free."""
        return _flops(self.to_json(), seq_len)

    def describe(self) -> str:
        """One line for logs: shape and parts."""
        a = self.attention
        mixers = sorted(set(self.layer_mixers()))
        parts = [f"dim {self.dim}", f"{self.n_layers} layers", f"{a.n_heads} heads ({a.n_kv_heads} kv, head dim "
                 f"{a.head_dim})", "+".join(mixers), self.ffn.kind]
        if self.moe.enabled:
            m = self.moe
            parts.append(f"{m.n_experts} experts top-{m.top_k}" + (f" + {m.shared} shared" if m.shared else "")
                         + (f", capacity {m.capacity:g}" if m.capacity else ""))
        if a.qk_norm:
            parts.append("qk-norm")
        if self.attention.window_pattern != "L" or a.sliding_window:
            parts.append(f"windows {[self.window(i) for i in range(self.n_layers)]}")
        if self.logit_softcap:
            parts.append(f"softcap {self.logit_softcap:g}")
        if self.shared_layers > 1:
            parts.append(f"blocks shared by {self.shared_layers} layers")
        if self.mup_base:
            parts.append(f"µP base width {self.mup_base}")
        if self.bitnet:
            parts.append("BitNet b1.58 (ternary weights, 8-bit activations)")
        parts.append("tied" if self.tie_embeddings else "untied")
        if self.mtp.depth:
            parts.append(f"{self.mtp.depth} MTP module{'s' if self.mtp.depth > 1 else ''}")
        return ", ".join(parts)

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every field under a dotted name ('attention.n_heads'), for comparisons and messages."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if k in _NESTED:
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> "ModelConfig":
        """A config from its JSON form, or from the flat form of the first release."""
        if not isinstance(d, dict):
            raise UserError(f"model config is a {type(d).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        flat = {k: v for k, v in d.items() if k in FLAT}
        unknown = set(d) - known - set(flat)
        if unknown:
            raise UserError(f"model config has unknown fields {sorted(unknown)} (made by a newer smedjan?)")
        nested = {}
        for name, kind in _NESTED.items():
            if name in d:
                sub = d[name]
                if not isinstance(sub, dict):
                    raise UserError(f"model config field {name!r} is not an object")
                fields = {f.name for f in dataclasses.fields(kind)}
                if set(sub) - fields:
                    raise UserError(f"model config {name} has unknown fields {sorted(set(sub) - fields)}")
                nested[name] = dict(sub)
        top = {k: v for k, v in d.items() if k in known and k not in _NESTED}
        if "vocab_size" not in top:
            raise UserError("model config lacks vocab_size")
        if flat:  # the first release's flat form
            extra_top, routed = _route(flat, dim=top.get("dim", 256))
            top.update(extra_top)
            for k, v in routed.items():
                if k in nested:
                    raise UserError(f"model config sets {k} both flat and nested")
                nested[k] = v
        try:
            nested = {k: _NESTED[k](**v) for k, v in nested.items()}
            return cls(**top, **nested)
        except TypeError as e:
            raise UserError(f"model config is malformed ({e})") from None


def parse_pattern(pattern: str) -> list[str]:
    """'attention*3,mla' -> ['attention', 'attention', 'attention', 'mla']."""
    out: list[str] = []
    for tok in pattern.split(","):
        name, _, times = tok.strip().partition("*")
        try:
            n = int(times) if times else 1
        except ValueError:
            n = 0
        if not name or not 1 <= n <= MAX_LAYERS:
            raise UserError(f"--layer-pattern {pattern!r}: {tok.strip()!r} is not NAME or NAME*N (N >= 1)")
        out += [name] * n
    return out


def _route(flat: dict, dim: int | None = None) -> tuple[dict, dict[str, dict]]:
    """Flat keywords -> (ModelConfig keyword arguments, {nested config: its fields})."""
    top_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    top: dict[str, Any] = {}
    nested: dict[str, dict] = {}
    flat = dict(flat)
    ffn_mult = flat.pop("ffn_mult", None)
    for k, v in flat.items():
        if k in FLAT:
            sect, name = FLAT[k]
            nested.setdefault(sect, {})[name] = v
        elif k in top_fields and k not in _NESTED:
            top[k] = v
        else:
            raise UserError(f"model config has unknown field {k!r}")
    if ffn_mult is not None:
        if not (isinstance(ffn_mult, (int, float)) and 0 < ffn_mult <= 64):
            raise UserError(f"--ffn-mult {ffn_mult} must be in (0, 64]")
        nested.setdefault("ffn", {})["hidden"] = ffn_hidden_for(top.get("dim", dim or 256), ffn_mult)
    if nested.get("mla", {}).get("latent_dim"):
        top.setdefault("mixer", "mla")
    if nested.get("block_sparse", {}).get("top_k"):
        top.setdefault("mixer", "block_sparse")
    if nested.get("moe", {}).get("n_experts", 0) > 1:
        nested.setdefault("ffn", {}).setdefault("kind", "moe")
    return top, nested


def _check_types(obj, where: str) -> None:
    """Every field of a config dataclass has its declared JSON type (ints are not bools,
    floats are finite): a config from a file may hold anything."""
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), str(f.type)
        ok = True
        if t == "int":
            ok = isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 62
        elif t == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if ok:
                setattr(obj, f.name, float(v))
        elif t == "bool":
            ok = isinstance(v, bool)
        elif t == "str":
            ok = isinstance(v, str) and len(v) < 1 << 12
        elif t.startswith("dict"):
            ok = isinstance(v, dict)
        if not ok:
            raise UserError(f"{where}: field {f.name!r} is {v!r}, expected {t.split('[')[0]}")


@functools.lru_cache(maxsize=64)
def _counts(cfg_json: str) -> tuple[int, int]:
    from smedjan.model.model import count_params

    return count_params(ModelConfig.from_dict(json.loads(cfg_json)))


@functools.lru_cache(maxsize=64)
def _flops(cfg_json: str, seq_len: int) -> float:
    from smedjan.model.model import model_flops

    return model_flops(ModelConfig.from_dict(json.loads(cfg_json)), seq_len)
