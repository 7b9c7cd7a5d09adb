"""What the memory levers save: saved-activation bytes, peak process memory and step time of
the training step of one preset (default: medium at batch 4 x 512 and a 32768 vocabulary)
for the baseline, each lever and all of them, every configuration in its own fresh process
of the same run (so each peak is its own), through `Trainer.train_step` as `smedjan train`
runs it. Then the output head and loss alone at a larger batch (default 8 x 1024), plain
against --fused-ce: the logits are the one [tokens, vocab] tensor, so this is where the
fused loss's saving shows whole.

- saved-activation bytes: what autograd keeps for the backward during one forward,
  counted by `smedjan.training.levers.SavedBytes` (each storage once, parameters left out,
  after any lever packed it);
- peak: the process's peak resident memory (CPU) or torch's peak allocation (CUDA);
- step: the median seconds of the timed steps (after one warm-up step).

    python bench/memory.py                                  # medium, 4 x 512, vocab 32768
    python bench/memory.py --size small --steps 3 --json
    python bench/memory.py --head-only --head-batch 8 --head-seq 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = {
    "baseline": {},
    "grad-accum 2": {"accum": 2},
    "gradient-checkpointing": {"checkpoint_every": 1},
    "fused-ce": {"fused_ce": True},
    "fp16-activations": {"fp16_activations": True},
    "all four": {"accum": 2, "checkpoint_every": 1, "fused_ce": True, "fp16_activations": True},
}
GiB = 1 << 30


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_one(name: str, a) -> dict:
    """One configuration's numbers, in this (fresh) process."""
    from smedjan.model import ModelConfig, Transformer
    from smedjan.optim import OptimizerSettings, build_optimizer, param_groups
    from smedjan.training.bench import FixedBatches
    from smedjan.training.heads import FusedCE
    from smedjan.training.levers import Levers, SavedBytes, apply_levers
    from smedjan.training.loop import Trainer, TrainerConfig
    from smedjan.training.pretrain import lm_loss
    from smedjan.training.schedule import Schedule

    spec = CONFIGS[name]
    dev = torch.device(a.device)
    accum = spec.get("accum", 1)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(a.size, a.vocab, max_seq_len=a.seq_len)
    model = Transformer(cfg).to(dev)
    lv = Levers(checkpoint_every=spec.get("checkpoint_every", 0), fp16_activations=spec.get("fp16_activations", False),
                fused_ce=spec.get("fused_ce", False), kernels="torch")
    apply_levers(model, lv, dev)
    opt = build_optimizer("adamw", param_groups(model, 0.1), OptimizerSettings(), dev)
    head = FusedCE() if lv.fused_ce else None
    saved: list[int] = []

    def loss_fn(m, batch):
        with SavedBytes() as sb:
            out = lm_loss(m, batch, head=head)
        saved.append(sb.total)
        return out

    amp = torch.bfloat16 if dev.type == "cuda" else None
    tcfg = TrainerConfig(tool="bench", steps=1 << 62, handle_signals=False, grad_accum=accum, amp_dtype=amp)
    trainer = Trainer(model, opt, Schedule("wso", 1 << 62, 0), FixedBatches(a.vocab, a.batch_size // accum, a.seq_len),
                      loss_fn, tcfg)
    before = _peak_bytes(dev)
    times, rec = [], {}
    for _ in range(1 + a.steps):
        t = time.perf_counter()
        rec = trainer.train_step()  # ends with a host sync (loss, gradient norm)
        times.append(time.perf_counter() - t)
    return {"config": name, "saved_bytes": max(saved), "peak_bytes": _peak_bytes(dev), "before_bytes": before,
            "step_s": statistics.median(times[1:]), "loss": rec["loss"]}


def head_one(kind: str, a) -> dict:
    """The output head and cross-entropy alone, forward and backward, at N = head batch x
    head seq positions: plain (full logits) or fused."""
    import torch.nn.functional as F

    from smedjan.kernels.linear_ce import linear_cross_entropy

    dev = torch.device(a.device)
    dim = {"tiny": 128, "small": 256, "medium": 512, "large": 1024}.get(a.size, 512)
    n = a.head_batch * a.head_seq
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, dim, generator=g).to(dev).requires_grad_()
    w = (0.02 * torch.randn(a.vocab, dim, generator=g)).to(dev).requires_grad_()
    y = torch.randint(0, a.vocab, (n,), generator=g).to(dev)
    before = _peak_bytes(dev)
    t = time.perf_counter()
    if kind == "plain":
        loss = F.cross_entropy(F.linear(h, w), y)
    else:
        loss = linear_cross_entropy(h, w, y)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"config": f"head {kind}", "peak_bytes": _peak_bytes(dev), "before_bytes": before,
            "step_s": time.perf_counter() - t, "loss": loss.item()}


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench/memory.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="medium")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--head-batch", type=int, default=8)
    p.add_argument("--head-seq", type=int, default=1024)
    p.add_argument("--head-only", action="store_true", help="only the head + loss comparison")
    p.add_argument("--no-head", action="store_true", help="skip the head + loss comparison")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--head", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a)))
        return
    if a.head:
        print(json.dumps(head_one(a.head, a)))
        return
    common = ["--size", a.size, "--vocab", str(a.vocab), "--batch-size", str(a.batch_size), "--seq-len",
              str(a.seq_len), "--steps", str(a.steps), "--head-batch", str(a.head_batch), "--head-seq",
              str(a.head_seq), "--device", a.device]
    rows = []
    if not a.head_only:
        for name in CONFIGS:
            rows.append(_child(["--one", name, *common]))
            print(f"{name}: done", file=sys.stderr, flush=True)
    if not a.no_head:
        for kind in ("plain", "fused"):
            rows.append(_child(["--head", kind, *common]))
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{a.size}, batch {a.batch_size} x {a.seq_len}, vocab {a.vocab}, {a.device}; head rows at "
          f"{a.head_batch} x {a.head_seq}")
    print("| config | saved activations GiB | vs baseline | peak GiB | peak - before 1st step GiB | step s | "
          "vs baseline |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0] if rows and rows[0]["config"] == "baseline" else None
    for r in rows:
        sv = r.get("saved_bytes")
        rel_s = f"{sv / base['saved_bytes']:.2f}x" if base and sv is not None else ""
        rel_t = f"{r['step_s'] / base['step_s']:.2f}x" if base and "head" not in r["config"] else ""
        print(f"| {r['config']} | {'' if sv is None else f'{sv / GiB:.3f}'} | {rel_s} | {r['peak_bytes'] / GiB:.2f} | "
              f"{(r['peak_bytes'] - r['before_bytes']) / GiB:.2f} | {r['step_s']:.2f} | {rel_t} |")


if __name__ == "__main__":
    main()
