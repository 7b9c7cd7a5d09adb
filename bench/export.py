"""Export the medium preset to GGUF q4_0, then decode with llama.cpp and with smedjan, in one run.

Prints: the time `export_gguf` takes to write medium as q4_0 (and f32, for reference), the
file sizes, and greedy decode tokens/s at batch 1 of llama.cpp (llama-cpp-python) on the
q4_0 and f32 files against smedjan's own KV-cache decode (`smedjan.infer`) of the same
weights in float32. Same prompt (16 random ids), same 128 new tokens, same thread count,
best of --repeat, prefill excluded on both sides. The weights are random (timing does not
depend on them); the tokenizer is a real 8192-token BPE so the file is a complete GGUF.

    python bench/export.py                          # medium, 2 threads
    python bench/export.py --threads 8 --preset small
    python bench/export.py --tokenizer runs/medium/tokenizer.bin
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "lib"))

import torch  # noqa: E402

from smedjan.data.sources import iter_chunks  # noqa: E402
from smedjan.export.gguf import export_gguf  # noqa: E402
from smedjan.formats import constants as C  # noqa: E402
from smedjan.formats.checkpoint import save_checkpoint  # noqa: E402
from smedjan.model import ModelConfig, Transformer  # noqa: E402
from smedjan.tokenizer import Tokenizer, train_bpe  # noqa: E402


def llama_cpp_decode_tps(path: Path, prompt: list[int], new_tokens: int, threads: int, repeat: int) -> float:
    """Greedy decode with llama.cpp's sampler; the clock starts after the first token (prefill)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    best = 0.0
    for _ in range(repeat):
        llm.reset()
        gen = llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
        next(gen)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(gen)
        best = max(best, (new_tokens - 1) / (time.perf_counter() - t0))
        gen.close()
    return best


def smedjan_decode_tps(model: Transformer, prompt_len: int, new_tokens: int, repeat: int) -> float:
    from smedjan.infer import decode_tokens_per_second

    return decode_tokens_per_second(model, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="medium", help="model preset (default: medium)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.bin (default: train an 8192-token BPE on data/)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default: 2)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default: 128)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs (default: 3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        texts = (c.text for c in iter_chunks([REPO / "data" / "pretrain"], max_chars=2_000_000))
        tok = train_bpe(texts, vocab_size=8192, workers=args.threads)
    cfg = ModelConfig.from_preset(args.preset, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    print(f"{args.preset}: {cfg.n_params() / 1e6:.1f}M parameters, vocab {cfg.vocab_size}, dim {cfg.dim}, "
          f"{cfg.n_layers} layers; {args.threads} threads; prompt 16 + {args.new_tokens} new tokens; "
          f"best of {args.repeat}", flush=True)

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "medium.bin"
        save_checkpoint(ck, model.state_dict(), kind=C.KIND_MODEL, config=cfg, tokenizer=tok)
        files = {}
        for quant in ("q4_0", "f32"):
            files[quant] = Path(tmp) / f"medium-{quant}.gguf"
            t0 = time.perf_counter()
            export_gguf(ck, files[quant], quant=quant)  # reads the checkpoint, converts, writes, fsyncs
            seconds = time.perf_counter() - t0
            rows.append((f"export-gguf {quant}: seconds", f"{seconds:.2f}"))
            rows.append((f"export-gguf {quant}: file MB", f"{files[quant].stat().st_size / 1e6:.1f}"))
        prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        for quant in ("q4_0", "f32"):
            tps = llama_cpp_decode_tps(files[quant], prompt, args.new_tokens, args.threads, args.repeat)
            rows.append((f"decode tok/s: llama.cpp, {quant} GGUF", f"{tps:.1f}"))
        tps = smedjan_decode_tps(model, 16, args.new_tokens, args.repeat)
        rows.append(("decode tok/s: smedjan (torch, float32, KV cache)", f"{tps:.1f}"))

    print()
    print("measure | value")
    print("--- | ---")
    for name, value in rows:
        print(f"{name} | {value}")
    print("\nnote: CPU timings on shared cores are noisy; compare rows of one run only.")


if __name__ == "__main__":
    main()
