"""Weight-space averaging of checkpoints of one model: sum_i w_i * theta_i with sum w_i = 1.

Averaging only makes sense between models of one architecture and one tokenizer (in
practice: checkpoints of one run, or fine-tunes of one base: "model soups", Wortsman et
al. 2022), so every input must have the same model config (the preset's name aside) and
tokenizer fingerprint; the first difference is refused, naming the field. Weights are
normalised (default: equal); each must be >= 0. The average is taken in float64 and stored
in the first input's dtype; inputs are read one at a time, so memory is about one model
plus a float64 accumulator. The output carries the config and the tokenizer.

    summary = merge_checkpoints(["a.bin", "b.bin"], "merged.bin", weights=[0.7, 0.3])
"""

from __future__ import annotations

import math

import torch

from smedjan.errors import UserError


def normalized_weights(n: int, weights: list[float] | None) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UserError(f"--weights has {len(weights)} values for {n} checkpoints; give one per checkpoint")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise UserError(f"--weights {w} must be a finite number >= 0")
    total = sum(weights)
    if total <= 0:
        raise UserError("--weights sum to 0; at least one must be positive")
    return [w / total for w in weights]


def _config_difference(a, b) -> str | None:
    da, db = a.flat(), b.flat()
    da.pop("preset"), db.pop("preset")
    for k in sorted(set(da) | set(db)):
        if da.get(k) != db.get(k):
            return f"{k} {da.get(k)!r} vs {db.get(k)!r}"
    return None


def merge_checkpoints(paths: list[str], output: str, weights: list[float] | None = None) -> dict:
    """Average `paths` into `output` (atomically); returns the summary."""
    from smedjan.formats import constants as C
    from smedjan.formats.checkpoint import TOKENIZER_TENSOR, load_checkpoint, save_checkpoint
    from smedjan.io import check_output_path
    from smedjan.model.load import checked_model_state

    if len(paths) < 2:
        raise UserError(f"merge needs at least two checkpoints, got {len(paths)}")
    w = normalized_weights(len(paths), weights)
    check_output_path(output)
    # First pass: every header and config, so a mismatch is refused before any averaging.
    first = load_checkpoint(paths[0])
    cfg, fp = first.config, first.fingerprint
    tok = first.tokenizer if TOKENIZER_TENSOR in first.tensors else None
    for p in paths[1:]:
        ck = load_checkpoint(p)
        diff = _config_difference(cfg, ck.config)
        if diff:
            raise UserError(f"{p}: model config differs from {paths[0]} ({diff}); only one architecture merges")
        if ck.fingerprint != fp:
            raise UserError(f"{p}: made with tokenizer {ck.fingerprint or '(none)'}, {paths[0]} with "
                            f"{fp or '(none)'}; only models of one tokenizer merge")
        del ck
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for i, (p, wi) in enumerate(zip(paths, w)):
        ck = first if i == 0 else load_checkpoint(p)
        first = None
        state = checked_model_state(ck)
        for k, v in state.items():
            if k not in acc:
                acc[k] = torch.zeros(v.shape, dtype=torch.float64)
                dtypes[k] = v.dtype
            acc[k].add_(v.double(), alpha=wi)
        del ck, state
    out = {k: v.to(dtypes[k]) for k, v in acc.items()}
    save_checkpoint(output, out, kind=C.KIND_MODEL, config=cfg, tokenizer=tok,
                    meta={"tool": "merge", "merged_from": [str(p) for p in paths], "weights": w})
    return {"output": str(output), "checkpoints": len(paths), "weights": [round(x, 6) for x in w],
            "params": cfg.n_params(), "tokenizer": fp or None}
