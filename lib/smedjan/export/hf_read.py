"""Reading a Hugging Face Llama folder: config.json + model.safetensors (or the shards its
index lists), F32/BF16/F16, LlamaForCausalLM or MistralForCausalLM, mapped onto smedjan's
names; tensors keep their dtype, so bf16 stays bit-exact. A `tokenizer.json` (byte-level
BPE) beside it is imported when it is one we encode exactly.

    src = read_hf_dir("tiny-random-llama")          # -> ModelSource (config, tensors, tokenizer)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from smedjan.errors import UserError
from smedjan.export.hf_config import config_from_hf
from smedjan.export.hf_tokenizer import _read_json, tokenizer_from_hf_json
from smedjan.export.names import external_names
from smedjan.export.source import ModelSource, check_tensors

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        wm = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise UserError(f"{index}: lacks a 'weight_map' object")
        files = []
        for key, name in wm.items():
            # A shard is a file of this folder, named relative to it: an absolute name or
            # one that climbs out with '..' is refused before anything is opened. Checked
            # on the name, not the resolved path, so that shards which are symlinks into a
            # cache (the Hugging Face hub's snapshots/ -> blobs/) still load.
            parts = Path(name).parts if isinstance(name, str) and "\0" not in name else ()
            if not parts or Path(name).is_absolute() or ".." in parts:
                raise UserError(f"{index}: shard {name!r} of tensor {key!r} is not a file name inside {d} "
                                "(a shard must lie in the model folder)")
        for name in dict.fromkeys(wm.values()):
            f = d / name
            if not f.is_file():
                raise UserError(f"{index}: shard {name!r} (holding e.g. {next(k for k, v in wm.items() if v == name)!r}) "
                                "does not exist")
            files.append(f)
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    if any(d.glob("pytorch_model*.bin")) or any(d.glob("*.pt")):
        raise UserError(f"{d}: holds only PyTorch pickle weights; smedjan reads safetensors only (no pickle)")
    raise UserError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the (sharded) files, in their stored dtype; names any bad one."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    dt = st.get_slice(name).get_dtype()
                    if dt not in SAFETENSORS_DTYPES:
                        raise UserError(f"{f}: tensor {name!r} has dtype {dt}; supported: "
                                        f"{', '.join(SAFETENSORS_DTYPES)}")
                    if name in out:
                        raise UserError(f"{f}: tensor {name!r} also appears in another shard")
                    out[name] = st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{f}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    return out


def read_hf_dir(d: str | os.PathLike, tokenizer=None) -> ModelSource:
    """An HF Llama folder as a ModelSource with smedjan tensor names."""
    d = Path(d)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{d}: no config.json (not a Hugging Face model folder)")
    raw = _read_json(cfg_path, "config.json")
    cfg, warnings = config_from_hf(raw, str(d))
    hf = read_safetensors(_weight_files(d))
    for name in [n for n in hf if n.endswith("rotary_emb.inv_freq")]:
        del hf[name]  # a buffer old transformers saved; recomputed from the config
    names = {e.name: e.local for e in external_names(cfg, "hf")}
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        # some tied checkpoints store the head anyway; fine when it is the embedding
        if not torch.equal(hf["lm_head.weight"], hf.get("model.embed_tokens.weight", torch.empty(0))):
            raise UserError(f"{d}: tensor 'lm_head.weight' differs from the embedding although "
                            "tie_word_embeddings is true")
        del hf["lm_head.weight"]
    extra = sorted(set(hf) - set(names))
    if extra:
        raise UserError(f"{d}: unexpected tensor {extra[0]!r} for a {raw['architectures'][0]} with this config")
    missing = sorted(set(names) - set(hf))
    if missing:
        raise UserError(f"{d}: missing tensor {missing[0]!r}")
    tensors = {names[k]: v for k, v in hf.items()}
    back = {v: k for k, v in names.items()}
    check_tensors(cfg, tensors, str(d), display=back)
    tok, note = tokenizer, None
    if tok is None:
        tj = d / "tokenizer.json"
        if tj.is_file():
            try:
                tok = tokenizer_from_hf_json(tj)
            except UserError as e:
                note = str(e)
                warnings.append(f"{tj}: not imported: {e}")
        else:
            note = f"{d} has no tokenizer.json"
    name = str(raw.get("_name_or_path") or d.name).rstrip("/").split("/")[-1]
    return ModelSource(path=d, config=cfg, tensors=tensors, tokenizer=tok, name=name, kind="hf",
                       meta={"hf_config": raw}, warnings=warnings, tokenizer_note=note)


