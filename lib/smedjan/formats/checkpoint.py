"""Checkpoints: safetensors files with smedjan metadata. No pickle on any load path.

Two kinds share the layout (tensors + a string->string `__metadata__`):
- `model` (final.bin, sft.bin, dpo.bin, imports): weights + model config + the
  tokenizer itself, so the file alone suffices for generation and export.
- `train_state` (state_N.bin): weights, optimizer state, RNG states, and in the
  metadata the step, the training config and the data-loader position: enough to
  resume bit for bit. It carries the tokenizer too.

Tensor names: model weights keep their module names (`layers.0.mixer.wq.weight`);
other tensors are namespaced (`optim.…`, `rng.…`); the tokenizer.bin bytes are the
uint8 tensor `smedjan.tokenizer`. Metadata keys: `kind`, `format_version`,
`model_config` (JSON), `tokenizer_fingerprint`, plus any kind-specific JSON values.

    save_checkpoint("final.bin", model.state_dict(), kind=KIND_MODEL, config=cfg, tokenizer=tok)
    ck = load_checkpoint("final.bin")            # -> Checkpoint(tensors, meta, config, tokenizer)
    model.load_state_dict(ck.model_state())
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.io import atomic_write, check_input_file

TOKENIZER_TENSOR = "smedjan.tokenizer"
# Format 1 (the first release) named the block's parts after the one architecture it had.
# Loading renames them; the flat model config of format 1 is read by ModelConfig.from_dict.
_V1_RENAMES = ((".attention_norm.", ".mixer_norm."), (".attention.", ".mixer."), (".feed_forward.", ".ffn."))
NON_MODEL_PREFIXES = ("optim.", "rng.", "smedjan.", "extra.")


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def config(self):
        from smedjan.model.config import ModelConfig

        try:
            return ModelConfig.from_dict(json.loads(self.meta["model_config"]))
        except (KeyError, json.JSONDecodeError) as e:
            raise UserError(f"{self.path}: model config missing or corrupt ({e})") from None
        except UserError as e:
            raise UserError(f"{self.path}: {e}") from None

    @property
    def tokenizer(self):
        from smedjan.tokenizer import Tokenizer

        t = self.tensors.get(TOKENIZER_TENSOR)
        if t is None:
            raise UserError(f"{self.path}: checkpoint carries no tokenizer; pass --tokenizer")
        tok = Tokenizer.from_bytes(t.numpy().tobytes(), f"{self.path} (embedded tokenizer)")
        if tok.fingerprint != self.meta.get("tokenizer_fingerprint"):
            raise UserError(f"{self.path}: embedded tokenizer does not match the recorded fingerprint (corrupt)")
        return tok

    @property
    def fingerprint(self) -> str:
        return self.meta.get("tokenizer_fingerprint", "")

    def json(self, key: str, default=None):
        """A JSON-valued metadata entry."""
        if key not in self.meta:
            return default
        try:
            return json.loads(self.meta[key])
        except json.JSONDecodeError:
            raise UserError(f"{self.path}: metadata {key!r} is not valid JSON (corrupt)") from None

    def model_state(self, merge_adapters: bool = True) -> dict[str, torch.Tensor]:
        """The model's tensors. A ReLoRA training state (`--lowrank`: adapters under
        `extra.relora.`) gives its function, W + B A alpha / R, as its final.bin would hold it;
        `merge_adapters=False`: the frozen W it holds (resuming)."""
        state = {k: v for k, v in self.tensors.items() if not k.startswith(NON_MODEL_PREFIXES)}
        if merge_adapters and "relora" in self.meta:
            from smedjan.training.relora import merged_state

            state = merged_state(self, state)
        return state

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _meta_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], *, kind: str, config=None,
                    tokenizer=None, meta: dict | None = None) -> None:
    """Write tensors + metadata atomically. `config` is a ModelConfig, `tokenizer` a Tokenizer.
    The free space is checked first (the size is known exactly); a full disk is one line."""
    from smedjan.formats import safetensors as st

    assert kind in (C.KIND_MODEL, C.KIND_TRAIN_STATE), kind
    out = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    md = {"kind": kind, "format_version": str(C.CHECKPOINT_FORMAT_VERSION), "format": "smedjan"}
    if config is not None:
        md["model_config"] = config.to_json()
    if tokenizer is not None:
        out[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(tokenizer.to_bytes()), dtype=torch.uint8)
        md["tokenizer_fingerprint"] = tokenizer.fingerprint
    for k, v in (meta or {}).items():
        md[k] = _meta_value(v)
    with atomic_write(path, expected_size=st.safetensors_size(out, md)) as f:
        st.write_safetensors(f, out, md)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, reading only its header."""
    p = check_input_file(path, "checkpoint")
    size = p.stat().st_size
    regen = C.REGENERATE[C.KIND_MODEL]
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{p}: truncated ({size} bytes), not a checkpoint; regenerate it with `{regen}`")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise UserError(f"{p}: not a safetensors checkpoint (bad header length; truncated or wrong file); "
                            f"regenerate it with `{regen}`")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{p}: not a safetensors checkpoint (corrupt header); regenerate it with `{regen}`") from None
    if not isinstance(header, dict):
        raise UserError(f"{p}: not a safetensors checkpoint (corrupt header)")
    md = header.get("__metadata__") or {}
    return md if isinstance(md, dict) else {}


def load_checkpoint(path: str | os.PathLike, kinds: tuple[str, ...] = (C.KIND_MODEL, C.KIND_TRAIN_STATE),
                    device: str = "cpu") -> Checkpoint:
    """Load and validate a smedjan checkpoint (any of `kinds`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    md = read_metadata(p)
    kind = md.get("kind")
    if md.get("format") != "smedjan" or kind is None:
        raise UserError(f"{p}: a safetensors file without smedjan metadata (an HF model? use "
                        "`smedjan import-hf`)")
    if kind not in kinds:
        want = " or ".join(kinds)
        raise UserError(f"{p}: is a {kind!r} checkpoint, expected {want}")
    if md.get("format_version") not in (str(C.CHECKPOINT_FORMAT_VERSION), "1"):
        raise UserError(f"{p}: checkpoint format version {md.get('format_version')}, this smedjan reads "
                        f"version {C.CHECKPOINT_FORMAT_VERSION}; regenerate it with `{C.REGENERATE[kind]}`")
    try:
        tensors = load_file(str(p), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{p}: corrupt or truncated checkpoint ({str(e).splitlines()[0]}); "
                        f"regenerate it with `{C.REGENERATE[kind]}`") from None
    if md["format_version"] == "1":
        tensors, md = _upgrade_v1(tensors, md)
    return Checkpoint(p, tensors, md)


def _v1_name(name: str) -> str:
    for old, new in _V1_RENAMES:
        if name.startswith("layers.") or name.startswith("optim.state.layers."):
            name = name.replace(old, new, 1) if old in name else name
    return name


def _upgrade_v1(tensors: dict[str, torch.Tensor], md: dict[str, str]) -> tuple[dict, dict]:
    """A format-1 checkpoint's tensors and metadata under today's names."""
    tensors = {_v1_name(k): v for k, v in tensors.items()}
    md = dict(md)
    if "optimizer" in md:
        try:
            opt = json.loads(md["optimizer"])
            for g in opt.get("param_groups", []):
                g["names"] = [_v1_name(n) for n in g.get("names", [])]
            opt["scalars"] = {_v1_name(k): v for k, v in opt.get("scalars", {}).items()}
            md["optimizer"] = json.dumps(opt, sort_keys=True)
        except (json.JSONDecodeError, AttributeError, TypeError):
            pass  # left as is: reading the optimizer state reports the corruption
    md["format_version"] = str(C.CHECKPOINT_FORMAT_VERSION)
    return tensors, md
