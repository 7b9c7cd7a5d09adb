"""DDP against FSDP (`--fsdp`) in the same run: `smedjan train` under `torchrun
--nproc-per-node N` (gloo on CPU, NCCL on CUDA) for one preset, each mode in its own
torchrun, printing the median step time (from metrics.jsonl's tok/s) and the optimizer
state bytes rank 0 holds after its first step (the trainer's `optim_state_bytes`).

    python bench/fsdp.py                              # small, 2 processes, 4 steps, CPU
    python bench/fsdp.py --size medium --nproc 2 --steps 6 --json

The data: a 2048-token BPE trained on the shipped corpus (first 1M characters) and
tinyshakespeare tokenized with `smedjan prepare`, made once in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def _data(folder: Path) -> tuple[Path, Path]:
    from smedjan.data.sources import iter_chunks
    from smedjan.tokenizer import train_bpe

    tok = folder / "tokenizer.bin"
    texts = (c.text for c in iter_chunks([DATA / "pretrain"], max_chars=1_000_000))
    train_bpe(texts, vocab_size=2048, workers=1).save(tok)
    out = folder / "train.bin"
    subprocess.run([sys.executable, "-m", "smedjan_tools.cli", "prepare", "--input",
                    str(DATA / "pretrain" / "tinyshakespeare.txt.zst"), "-t", str(tok), "-o", str(out),
                    "--txt-split", "blank", "--workers", "1"], check=True, capture_output=True)
    return tok, out


def run_mode(mode: str, a, tok: Path, data: Path, folder: Path) -> dict:
    run = folder / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
           "-m", "smedjan_tools.cli", "train", "--size", a.size, "--dataset", str(data), "--tokenizer", str(tok),
           "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
           "--checkpoint-dir", str(run), "--checkpoint-every", "0", *(["--fsdp"] if mode == "fsdp" else [])]
    env = {**os.environ, "SMEDJAN_PLAIN_PROGRESS": "1", "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{mode}: {proc.stderr[-2000:]}")
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r for r in recs if "tok_s" in r and r["tok_s"] > 0]
    seconds = [r["tokens"] / r["tok_s"] for r in steps[1:] or steps]  # the first step warms up
    return {"mode": mode, "step_s": statistics.median(seconds), "optim_state_bytes": steps[0]["optim_state_bytes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tok, data = _data(folder)
        rows = [run_mode(m, a, tok, data, folder) for m in ("ddp", "fsdp")]
    if a.json:
        print(json.dumps({"size": a.size, "nproc": a.nproc, "rows": rows}))
        return
    print(f"{a.size}, {a.nproc} processes, batch {a.batch_size} x {a.seq_len} per process, {a.steps} steps")
    for r in rows:
        print(f"{r['mode']:5} step {r['step_s']:.3f} s  optimizer state on rank 0 {r['optim_state_bytes']:,} bytes")
    print(f"FSDP / DDP optimizer state: {rows[1]['optim_state_bytes'] / rows[0]['optim_state_bytes']:.3f}")


if __name__ == "__main__":
    main()
