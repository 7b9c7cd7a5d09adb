"""smedjan's training step vs two peers at the same shapes and parameter count, in the same
process, alternating rounds: a plain, minimal PyTorch GPT loop (bench/_ref_gpt.py) and
Hugging Face transformers' LlamaForCausalLM (sdpa attention), both trained with the same
AdamW settings (lr 3e-4, betas 0.9/0.95, eps 1e-5, wd 0.1 on matrices, clip 1.0).

    python bench/train.py                       # small and medium, batch 4 x 128, eager
    python bench/train.py --compile             # adds smedjan under torch.compile
    python bench/train.py --size small --rounds 7 --steps 10 --json
    python bench/train.py --no-hf                 # without the transformers peer

Each round times every loop back to back (forward, then train), so load from other
processes hits them alike; the ratio reported is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ref_gpt import RefGPT, make_optimizer, train_step  # noqa: E402

from smedjan.model import ModelConfig  # noqa: E402
from smedjan.training.bench import FixedBatches, SmedjanRunner, interleave, median, ratios  # noqa: E402


class RefRunner:
    def __init__(self, cfg: ModelConfig, batch_size: int, seq_len: int, device: torch.device, seed: int = 0,
                 amp_dtype: torch.dtype | None = None):
        a = cfg.attention
        assert a.n_kv_heads == a.n_heads and cfg.tie_embeddings
        torch.manual_seed(seed)
        self.device, self.amp_dtype = device, amp_dtype
        self.model = RefGPT(cfg.vocab_size, cfg.dim, cfg.n_layers, a.n_heads, cfg.ffn.hidden, seq_len).to(device)
        assert sum(p.numel() for p in self.model.parameters()) == cfg.n_params(), "reference must match in size"
        self.opt = make_optimizer(self.model)
        self.source = FixedBatches(cfg.vocab_size, batch_size, seq_len, seed=seed)
        self.tokens_per_step = batch_size * seq_len

    def _autocast(self):
        # On GPU both loops run under the same bf16 autocast, so the ratio compares loops, not precisions.
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.amp_dtype)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train(self, n: int) -> float:
        self._sync()
        t = time.perf_counter()
        for _ in range(n):
            x, y = self.source.next_batch()
            with self._autocast():
                loss = self.model(x.to(self.device), y.to(self.device))
            train_step(self.model, self.opt, loss)
        self._sync()
        return time.perf_counter() - t

    def forward(self, n: int) -> float:
        x = self.source.batches[0][0].to(self.device)
        with torch.no_grad(), self._autocast():
            self._sync()
            t = time.perf_counter()
            for _ in range(n):
                self.model(x)
            self._sync()
            return time.perf_counter() - t


class HFRunner(RefRunner):
    """transformers' LlamaForCausalLM at the same shapes (tied head, no biases, sdpa), trained
    by the same loop and optimizer as the plain peer; loss = CE of its logits on the targets."""

    def __init__(self, cfg: ModelConfig, batch_size: int, seq_len: int, device: torch.device, seed: int = 0,
                 amp_dtype: torch.dtype | None = None):
        from transformers import LlamaConfig, LlamaForCausalLM

        a = cfg.attention
        torch.manual_seed(seed)
        self.device, self.amp_dtype = device, amp_dtype
        hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn.hidden,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, max_position_embeddings=seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope.theta, tie_word_embeddings=True,
                         attention_bias=False, mlp_bias=False, use_cache=False)
        hf._attn_implementation = "sdpa"
        self.hf = LlamaForCausalLM(hf).to(device)
        assert sum(p.numel() for p in self.hf.parameters()) == cfg.n_params(), "the peer must match in size"
        self.model = _Logits(self.hf)
        self.opt = make_optimizer(self.hf)
        self.source = FixedBatches(cfg.vocab_size, batch_size, seq_len, seed=seed)
        self.tokens_per_step = batch_size * seq_len


class _Logits(torch.nn.Module):
    """model(x) -> logits, model(x, y) -> mean CE, like the plain peer."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x, y=None):
        logits = self.hf(input_ids=x).logits
        if y is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", action="append", help="preset(s) (default: small and medium)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8, help="steps per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    ap.add_argument("--compile", action="store_true", help="also time smedjan under torch.compile")
    ap.add_argument("--device", default=None)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for every loop on CPU too (always on CUDA)")
    ap.add_argument("--no-hf", action="store_true", help="leave out the transformers LlamaForCausalLM peer")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device) if a.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" or a.bf16 else None
    report = []
    for size in a.size or ["small", "medium"]:
        cfg = ModelConfig.from_preset(size, a.vocab_size, max_seq_len=a.seq_len)
        runners = {"plain": RefRunner(cfg, a.batch_size, a.seq_len, device, amp_dtype=amp),
                   "smedjan": SmedjanRunner(cfg, a.batch_size, a.seq_len, device, amp_dtype=amp)}
        if not a.no_hf and importlib.util.find_spec("transformers") is None:
            print("transformers is not installed: the LlamaForCausalLM peer is left out "
                  "(pip install -e '.[test]' adds it)", file=sys.stderr)
        elif not a.no_hf:
            runners["hf"] = HFRunner(cfg, a.batch_size, a.seq_len, device, amp_dtype=amp)
        if a.compile:
            runners["smedjan --compile"] = SmedjanRunner(cfg, a.batch_size, a.seq_len, device, compile=True,
                                                         amp_dtype=amp)
        print(f"{size}: {cfg.n_params():,} parameters, batch {a.batch_size} x {a.seq_len}, {device}"
              f"{' bf16 autocast' if amp else ' fp32'}, "
              f"threads {torch.get_num_threads()}; {a.rounds} rounds x {a.steps} steps", file=sys.stderr, flush=True)
        res = interleave(runners, rounds=a.rounds, steps=a.steps,
                         on_round=lambda r: print(f"  round {r}/{a.rounds}", file=sys.stderr, flush=True))
        for name in runners:
            row = {"size": size, "loop": name, "forward_tok_s": median(res[name]["forward"]),
                   "train_tok_s": median(res[name]["train"])}
            if name != "plain":
                row["train_ratio"] = median(ratios(res, name, "plain", "train"))
                row["forward_ratio"] = median(ratios(res, name, "plain", "forward"))
                row["train_ratio_rounds"] = [round(r, 3) for r in ratios(res, name, "plain", "train")]
            if name.startswith("smedjan") and "hf" in runners:
                row["train_vs_hf"] = median(ratios(res, name, "hf", "train"))
                row["forward_vs_hf"] = median(ratios(res, name, "hf", "forward"))
            report.append(row)
        del runners
    if a.json:
        print(json.dumps(report))
        return
    print("| preset | loop | forward tok/s | train tok/s | train vs plain | forward vs plain | train vs HF | "
          "forward vs HF |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report:
        rt = f"{r['train_ratio']:.2f}x" if "train_ratio" in r else "1.00x"
        rf = f"{r['forward_ratio']:.2f}x" if "forward_ratio" in r else "1.00x"
        ht = f"{r['train_vs_hf']:.2f}x" if "train_vs_hf" in r else ""
        hfw = f"{r['forward_vs_hf']:.2f}x" if "forward_vs_hf" in r else ""
        print(f"| {r['size']} | {r['loop']} | {r['forward_tok_s']:,.0f} | {r['train_tok_s']:,.0f} | {rt} | {rf} | "
              f"{ht} | {hfw} |")
    print(f"\nbatch {a.batch_size} x seq {a.seq_len}, vocab {a.vocab_size}, {device}"
          f"{', bf16 autocast' if amp else ', fp32'}, threads {torch.get_num_threads()}; ratios are medians of "
          "per-round ratios (loops alternate within each round)")


if __name__ == "__main__":
    main()
