"""Training quality side by side: the tiny pipeline's model and budget (pipelines/tiny.toml:
its tokenizer and token files from the shipped corpus, its steps, batch and sequence
length) trained once per row, one row after another in one run; prints val loss, val
bits per byte, tok/s and wall time of each.

    python bench/quality.py                          # every row at the full budget (~6 min a row on 2 cores)
    python bench/quality.py --rows adamw,hybrid      # some rows
    python bench/quality.py --steps 160 --json       # a shorter proxy

A row is a name and the flags it changes relative to the tiny pipeline's [train] section
(ROWS below: adding an optimizer or a menu option is one line). `adamw (before)` is the
recipe the tiny pipeline shipped before the optimizer menu (AdamW, cosine 3e-3 -> 3e-4,
warmup 50, the tiny preset as is); `recipe` is pipelines/tiny.toml as it is now. The
tokenizer and token files are made once into --work (default runs/quality) with the
pipeline's own flags. Rows share the machine in turn, so on a machine shared with other
work compare tok/s within one run (load moves every row's timing; val loss does not
depend on it: fixed steps, fixed seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = {"size": "tiny", "batch_size": 16, "seq_len": 256, "steps": 480, "lr": 3e-3, "min_lr": 3e-4, "warmup": 50,
          "lr_schedule": "cosine", "optimizer": "adamw"}
# The hybrid has a rate per role (no --lr): the same schedule floor as a fraction.
HYBRID = {"lr": None, "min_lr": None, "final_lr_frac": 0.1}
# name -> flags over the tiny pipeline's [train] section ({} = the recipe as shipped).
# "BEFORE" rows start from the old recipe instead, so they isolate the optimizer.
ROWS: dict[str, tuple[str, dict]] = {
    "adamw (before)": ("BEFORE", {}),
    "adamw-8bit": ("BEFORE", {"optimizer": "adamw-8bit"}),
    "adamw-cpu": ("BEFORE", {"optimizer": "adamw-cpu"}),
    "sophia": ("BEFORE", {"optimizer": "sophia"}),
    "muon": ("BEFORE", {"optimizer": "muon"}),
    "hybrid": ("BEFORE", {"optimizer": "hybrid", **HYBRID}),
    "recipe (tiny.toml)": ("RECIPE", {}),
    # Mixture-of-Experts: 8 SwiGLU experts top-2 in every layer (2x the FFN FLOPs a token runs, 8x its
    # FFN parameters), and the dense model of equal active parameters (FFN 2 x 512 wide)
    "moe-8x2": ("BEFORE", {"n_experts": 8, "top_k_experts": 2}),
    "moe-dense-equal": ("BEFORE", {"size": "custom", "dim": 128, "layers": 4, "heads": 4, "ffn_mult": 8.0}),
    # EMA, the regularisers and the curriculum (smedjan.training.regularisers, .curriculum),
    # each over the recipe
    "ema": ("RECIPE", {"ema_decay": 0.99}),
    "dropout": ("RECIPE", {"dropout": 0.1}),
    "stochastic-depth": ("RECIPE", {"stochastic_depth": 0.1}),
    "noise": ("RECIPE", {"noise_scale": 1e-6}),
    "shared-layers": ("RECIPE", {"shared_layers": 2}),
    "freeze": ("RECIPE", {"freeze_fraction": 0.5}),
    "curriculum": ("RECIPE", {"curriculum": 100}),
    # µP (smedjan.model.mup): the old recipe's adamw rate read as tuned at width 32, run at 128
    "mup (base 32)": ("BEFORE", {"mup_base": 32}),
    # multi-token prediction: the recipe predicting 2 tokens (one DeepSeek-V3 MTP module)
    "mtp (n-predict 2)": ("RECIPE", {"n_predict": 2}),
    # Low-rank training (rank 32 of the tiny model's 128-wide matrices) without and with ReLoRA's
    # merges (smedjan.training.relora), over the AdamW recipe (the hybrid's Muon is refused)
    "lowrank-32": ("BEFORE", {"lowrank": 32}),
    "relora-32": ("BEFORE", {"lowrank": 32, "relora_interval": 120, "relora_warmup": 10}),
    # BitNet b1.58 (smedjan.model.bitnet) on AdamW: the paper's recipe wants a higher rate than
    # full precision; here twice the old recipe's 3e-3 (the same cosine to a tenth)
    "bitnet": ("BEFORE", {"bitnet": True, "lr": 6e-3, "min_lr": 6e-4}),
    "bitnet (lr 3e-3)": ("BEFORE", {"bitnet": True}),
}


def flags(section: dict) -> list[str]:
    out = []
    for k, v in section.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        elif v is not None:
            out += [flag, str(v)]
    return out


def prepare(pipeline: dict, work: Path) -> tuple[Path, Path, Path]:
    """tokenizer.bin, train.bin, val.bin of the pipeline's corpus, made once."""
    work.mkdir(parents=True, exist_ok=True)
    tok, train, val = work / "tokenizer.bin", work / "train.bin", work / "val.bin"
    inputs = [str(ROOT / p) for p in pipeline["corpus"]["input"]]
    if not tok.exists():
        subprocess.run(["smedjan", "tokenizer", *sum((["--input", i] for i in inputs), []), "--output", str(tok),
                        *flags(pipeline.get("tokenizer", {}))], check=True)
    if not (train.exists() and val.exists()):
        subprocess.run(["smedjan", "prepare", *sum((["--input", i] for i in inputs), []), "--tokenizer", str(tok),
                        "--output", str(train), "--val-output", str(val), *flags(pipeline.get("prepare", {}))],
                       check=True)
    return tok, train, val


def run_row(name: str, section: dict, files, work: Path, steps: int | None, threads: int,
            validate: bool = True) -> dict:
    tok, train, val = files
    section = dict(section)
    if not validate:
        section.pop("val_tokens", None)
    if steps is not None:
        section["steps"] = steps
        if "warmup" in section:  # keep the warmup's share of the run
            section["warmup"] = max(1, round(section["warmup"] * steps / BEFORE["steps"]))
    for k in ("checkpoint_every", "eval_every", "keep"):
        section.pop(k, None)
    folder = work / "rows" / name.split()[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["smedjan", "train", "--dataset", str(train), *(["--val-dataset", str(val)] if validate else []),
           "--tokenizer", str(tok),
           *flags(section), "--checkpoint-every", "0", "--checkpoint-dir", str(folder), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SMEDJAN_PLAIN_PROGRESS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"row": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    s = json.loads(proc.stdout)
    if not validate:
        return {"row": name, "tok_s": s["tokens"] / s["seconds"]}
    return {"row": name, "val_loss": s["val_loss"], "val_bpb": s["val_bpb"], "tok_s": s["tokens"] / s["seconds"],
            "train_seconds": s["seconds"], "wall_seconds": wall, "flags": " ".join(flags(section))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", help="comma-separated row names (or their first words); default all")
    ap.add_argument("--steps", type=int, help="override the budget's steps (a shorter proxy); warmup scales along")
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "tiny.toml"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "quality"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                    help='an ad-hoc row: name={"flag": value, ...} over the old recipe (experiments)')
    ap.add_argument("--speed", type=int, metavar="STEPS",
                    help="only time the rows: STEPS steps each, no validation, in --rounds alternating rounds; "
                         "prints the median tok/s and its ratio to the first row's")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    pipeline = tomllib.loads(Path(a.pipeline).read_text())
    recipe = {k: v for k, v in pipeline["train"].items() if k not in ("val_tokens",)}
    bases = {"BEFORE": BEFORE, "RECIPE": recipe}
    rows = dict(ROWS)
    for spec in a.extra:
        name, _, js = spec.partition("=")
        rows[name] = ("BEFORE", json.loads(js))
    extra = [n for n in rows if n not in ROWS]
    chosen = list(rows) if not a.rows else [n for n in rows if n in extra or any(n == r or n.split()[0] == r
                                                                                  for r in a.rows.split(","))]
    work = Path(a.work)
    files = prepare(pipeline, work)
    val_tokens = pipeline["train"].get("val_tokens")
    if a.speed:
        speed(chosen, rows, bases, files, work, a)
        return
    results = []
    for name in chosen:
        base, over = rows[name]
        section = {**bases[base], **over, **({"val_tokens": val_tokens} if val_tokens else {})}
        r = run_row(name, section, files, work, a.steps, a.threads)
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(results, indent=1))
        return
    ref = next((r for r in results if "val_loss" in r and r["row"] == "adamw (before)"), None)
    print(f"| row | val loss | val bpb | tok/s | train s | vs adamw (before) |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | error: {r['error']} | | | | |")
            continue
        rel = (f"{100 * (r['val_loss'] / ref['val_loss'] - 1):+.1f}% loss, "
               f"{r['train_seconds'] / ref['train_seconds']:.2f}x time") if ref else ""
        print(f"| {r['row']} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['tok_s']:,.0f} | "
              f"{r['train_seconds']:.0f} | {rel} |")


def speed(chosen: list[str], rows: dict, bases: dict, files, work: Path, a) -> None:
    """Alternating rounds, so load from other processes hits every row alike; median tok/s."""
    import statistics

    got: dict[str, list[float]] = {n: [] for n in chosen}
    for _ in range(a.rounds):
        for name in chosen:
            base, over = rows[name]
            r = run_row(name, {**bases[base], **over}, files, work, a.speed, a.threads, validate=False)
            if "error" in r:
                raise SystemExit(f"{name}: {r['error']}")
            got[name].append(r["tok_s"])
    med = {n: statistics.median(v) for n, v in got.items()}
    first = med[chosen[0]]
    for n in chosen:
        print(f"| {n} | {med[n]:,.0f} tok/s | {first / med[n]:.2f}x the time of {chosen[0]} | "
              f"rounds {', '.join(f'{v:,.0f}' for v in got[n])} |")


if __name__ == "__main__":
    main()
