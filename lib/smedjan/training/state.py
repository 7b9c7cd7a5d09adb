"""The full training state in one `train_state` checkpoint (state_N.bin): enough to resume
bit for bit.

Tensors (safetensors, no pickle):
- model weights under their module names (`layers.0.mixer.wq.weight`, ...);
- optimizer state per parameter *name*: `optim.state.<param name>.<key>` (exp_avg, ...),
  so the file is readable and independent of parameter order;
- RNG states: `rng.torch_cpu` (uint8), `rng.cuda.<i>` (uint8), `rng.numpy` (the MT19937
  key, int64[624]), `rng.python` (the Mersenne twister words, int64[625]);
- the tokenizer (`smedjan.tokenizer`), as in every checkpoint.
Metadata (JSON strings): `tool` (which tool's run: train, sft, dpo, distill; a state is
only resumed by the same tool), `step`, `trainer` (counters: bad steps, best val, ...),
`source` (the batch source's `state_dict()`), `run_config` (the tool's flags),
`optimizer` (class, param groups, non-tensor state), `rng` (numpy/python scalars),
`world_size`, `model_config`, `tokenizer_fingerprint`.

    save_train_state(path, model=m, optimizer=opt, model_config=cfg, tokenizer=tok, tool="train",
                     step=100, trainer={...}, source=loader.state_dict(), run_config={...})
    st = read_train_state(path, tool="train")       # validated metadata, tensors loaded
    apply_train_state(st, model, optimizer)          # weights, optimizer, RNG
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from smedjan.model.load import check_state_shapes

STATE_RE = re.compile(r"^state_(\d+)\.bin$")
# Param-group keys that describe *how* the optimizer runs here (or what the current
# flags ask for), not state to restore: kept from the freshly built optimizer on load.
_GROUP_KEYS_KEPT = ("fused", "foreach", "capturable", "differentiable", "peak_lr", "weight_decay", "names",
                    "peak_wd")


def state_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"state_{step}.bin"


def list_states(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every state_N.bin in `folder`, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := STATE_RE.match(n))]
    return sorted(found)


# ------------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert kind == "MT19937", kind
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, words, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(words, dtype=torch.int64)
    meta = {"numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "gauss_next": gauss_next}}
    return tensors, meta


def restore_rng(ck: Checkpoint) -> None:
    meta = ck.json("rng", {})
    t = ck.tensors
    try:
        torch.set_rng_state(t["rng.torch_cpu"])
        n = meta["numpy"]
        np.random.set_state(("MT19937", t["rng.numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = meta["python"]
        random.setstate((p["version"], tuple(int(v) for v in t["rng.python"].tolist()), p["gauss_next"]))
        cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in t.items() if k.startswith("rng.cuda."))
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:
        # OverflowError: a Mersenne twister word out of range (random.setstate)
        raise UserError(f"{ck.path}: RNG state missing or corrupt ({e.__class__.__name__}: {e})") from None
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([v for _, v in cuda])


# ------------------------------------------------------------------------- optimizer
def _index_names(optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = []
    for g in optimizer.param_groups:
        assert "names" in g and len(g["names"]) == len(g["params"]), "param groups must carry `names`"
        names.append(list(g["names"]))
    return names


def optimizer_to_checkpoint(optimizer: torch.optim.Optimizer, sd: dict | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors under `optim.state.`, JSON meta) of an optimizer built by smedjan.optim;
    `sd`: its state dict when not optimizer.state_dict() (FSDP: gathered whole)."""
    sd = optimizer.state_dict() if sd is None else sd
    flat_names = [n for names in _index_names(optimizer) for n in names]
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        name = flat_names[idx]
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.state.{name}.{key}"] = v
            else:
                scalars.setdefault(name, {})[key] = v
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}


# The state every parameter of these optimizers holds once it has stepped (AdamW with
# amsgrad adds max_exp_avg_sq); other optimizers are checked for consistency only.
_STATE_KEYS = {"AdamW": {"step", "exp_avg", "exp_avg_sq"}, "Adam": {"step", "exp_avg", "exp_avg_sq"}}


def _check_param_state(path, name: str, st: dict, param: torch.Tensor, group: dict,
                       optimizer: torch.optim.Optimizer) -> None:
    """A parameter's saved optimizer state must have the keys its optimizer uses and, for
    every tensor beyond a scalar, the shape the optimizer keeps it in (the parameter's,
    unless it says otherwise: `state_shape`): else the first step would fail."""
    cls = type(optimizer).__name__
    shape_of = getattr(optimizer, "state_shape", lambda key, p: tuple(p.shape))
    want = _STATE_KEYS.get(cls)
    if want is not None:
        want = want | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        if set(st) != want:
            raise UserError(f"{path}: optimizer state of {name!r} has {sorted(st)}, expected {sorted(want)} (corrupt)")
    for key, v in st.items():
        if isinstance(v, torch.Tensor) and v.dim() and tuple(v.shape) != tuple(shape_of(key, param)):
            raise UserError(f"{path}: optimizer state {name}.{key} has shape {tuple(v.shape)}, expected "
                            f"{tuple(shape_of(key, param))} for the parameter of shape {tuple(param.shape)} (corrupt)")
        if key == "step" and not (isinstance(v, (int, float)) or isinstance(v, torch.Tensor) and v.dim() == 0):
            raise UserError(f"{path}: optimizer state {name}.step is not a number (corrupt)")


def optimizer_from_checkpoint(optimizer: torch.optim.Optimizer, ck: Checkpoint, load=None) -> None:
    """Restore `ck`'s optimizer state; `load(state, groups)` replaces optimizer.load_state_dict (FSDP)."""
    meta = ck.json("optimizer")
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) or not all(
            isinstance(g, dict) for g in meta["param_groups"]) or not isinstance(meta.get("scalars", {}), dict):
        raise UserError(f"{ck.path}: optimizer state missing or corrupt")
    cls = type(optimizer).__name__
    if meta.get("class") != cls:
        raise UserError(f"{ck.path}: holds {meta.get('class')} state, this run uses {cls} (--optimizer differs)")
    current = optimizer.state_dict()["param_groups"]
    names = _index_names(optimizer)
    saved = meta["param_groups"]
    if [g.get("names") for g in saved] != names:
        raise UserError(f"{ck.path}: optimizer parameter groups differ from this model's (another model or "
                        "another smedjan?)")
    # `optim.state.<param name>.<key>`: optimizer state keys (exp_avg, step, ...) have no dots.
    per_name: dict[str, dict] = {}
    for k, v in ck.prefixed("optim.state.").items():
        name, _, key = k.rpartition(".")
        per_name.setdefault(name, {})[key] = v
    for name, extra in meta.get("scalars", {}).items():
        if not isinstance(extra, dict):
            raise UserError(f"{ck.path}: optimizer state missing or corrupt (scalars of {name!r})")
        per_name.setdefault(name, {}).update(extra)
    flat = [n for ns in names for n in ns]
    unknown = set(per_name) - set(flat)
    if unknown:
        raise UserError(f"{ck.path}: optimizer state for unknown parameter {sorted(unknown)[0]!r}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    group_of = [g for g in saved for _ in g["names"]]
    for idx, name in enumerate(flat):
        if name in per_name:
            _check_param_state(ck.path, name, per_name[name], params[idx], group_of[idx], optimizer)
    state = {idx: per_name[name] for idx, name in enumerate(flat) if name in per_name}
    groups = [_restored_group(cur, sv, ck.path) for cur, sv in zip(current, saved)]
    try:
        if load is None:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        else:
            load(state, groups)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{ck.path}: optimizer state does not fit this model ({e})") from None


def _same_kind(a, b) -> bool:
    """Whether saved value `b` may stand in for the optimizer's own value `a`."""
    if isinstance(a, bool) or a is None:
        return type(b) is type(a)
    if isinstance(a, (int, float)):
        return isinstance(b, (int, float)) and not isinstance(b, bool)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same_kind(x, y) for x, y in zip(a, b))
    return type(b) is type(a)


def _restored_group(cur: dict, saved, path) -> dict:
    """The optimizer's param group `cur` with the saved hyperparameters (lr, betas, ...): every
    key the optimizer has must be saved, with a value of the same kind; keys in
    `_GROUP_KEYS_KEPT` stay the current run's."""
    if not isinstance(saved, dict):
        raise UserError(f"{path}: optimizer state missing or corrupt (a parameter group is not an object)")
    g = {"params": cur["params"]}
    for k, v in cur.items():
        if k == "params" or k in _GROUP_KEYS_KEPT:
            g[k] = v
        elif k not in saved or not _same_kind(v, saved[k]):
            raise UserError(f"{path}: optimizer state missing or corrupt (parameter group value {k!r})")
        else:
            g[k] = tuple(saved[k]) if isinstance(v, tuple) else saved[k]
    return g


# ---------------------------------------------------------------------------- files
@dataclass
class LoadedState:
    ck: Checkpoint
    step: int
    tool: str
    trainer: dict
    source: dict
    run_config: dict
    world_size: int


def save_train_state(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     model_config, tokenizer, tool: str, step: int, trainer: dict, source: dict,
                     run_config: dict, world_size: int = 1, model_state: dict | None = None,
                     optimizer_state: dict | None = None, extra: tuple[dict, dict] = ({}, {})) -> None:
    """Write the whole training state atomically (a crash mid-write leaves no state_N.bin).
    `model_state`/`optimizer_state`: the state dicts when not the modules' own (FSDP);
    `extra`: (tensors named `extra.*`, metadata) of what trains beside the model (the EMA)."""
    tensors = dict(model.state_dict() if model_state is None else model_state)
    opt_tensors, opt_meta = optimizer_to_checkpoint(optimizer, optimizer_state)
    rng_tensors, rng_meta = capture_rng()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    meta = {"tool": tool, "step": step, "trainer": trainer, "source": source, "run_config": run_config,
            "optimizer": opt_meta, "rng": rng_meta, "world_size": world_size}
    tensors.update(extra[0])
    meta.update(extra[1])
    save_checkpoint(path, tensors, kind=C.KIND_TRAIN_STATE, config=model_config, tokenizer=tokenizer, meta=meta)


def read_train_state(path: str | os.PathLike, tool: str) -> LoadedState:
    """Load a state_N.bin and check it is one of `tool`'s (a `train` state is refused by sft)."""
    ck = load_checkpoint(path, kinds=(C.KIND_TRAIN_STATE,))
    got = ck.meta.get("tool")
    if got != tool:
        raise UserError(f"{path}: is a state of `smedjan {got}`, not of `smedjan {tool}`; "
                        f"resume it with `smedjan {got} --resume`")
    step, trainer, source, run_config = ck.json("step"), ck.json("trainer"), ck.json("source"), ck.json("run_config")
    if not isinstance(step, int) or step < 0 or not all(isinstance(d, dict) for d in (trainer, source, run_config)):
        raise UserError(f"{path}: training state metadata is missing or corrupt")
    return LoadedState(ck, step, got, trainer, source, run_config, int(ck.json("world_size", 1)))


def load_model_weights(model: torch.nn.Module, ck: Checkpoint, merge_adapters: bool = True) -> None:
    """Copy `ck`'s weights into `model` (same config), naming the first mismatch
    (`merge_adapters`: see Checkpoint.model_state)."""
    state = ck.model_state(merge_adapters)
    check_state_shapes(ck.path, state, model, "this model")
    model.load_state_dict(state, strict=True)


def apply_train_state(st: LoadedState, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore weights, optimizer state and every RNG from a loaded state (into a model
    sharded by smedjan.training.fsdp too: every rank reads the whole file and keeps its shard)."""
    from smedjan.training import fsdp

    if fsdp.is_sharded(model):
        state = st.ck.model_state(merge_adapters=False)  # ReLoRA: the frozen W; the adapters come back apart
        check_state_shapes(st.ck.path, state, model, "this model")
        fsdp.load_full_model_state(model, state)
        optimizer_from_checkpoint(optimizer, st.ck,
                                  load=lambda s, g: fsdp.load_full_optimizer_state(model, optimizer, s, g))
        restore_rng(st.ck)
        return
    load_model_weights(model, st.ck, merge_adapters=False)
    optimizer_from_checkpoint(optimizer, st.ck)
    restore_rng(st.ck)


def config_diff(a, b) -> list[str]:
    """Fields where two ModelConfigs differ, as 'field a -> b' (nested fields dotted:
    'attention.n_heads 4 -> 8')."""
    da, db = a.flat(), b.flat()
    return [f"{k} {da.get(k)!r} -> {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
