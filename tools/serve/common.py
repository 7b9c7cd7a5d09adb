"""Flags and loading shared by `smedjan generate`, `chat` and `serve`.

    model, tok, engine = load_engine(checkpoint, device=None, dtype="auto", threads=None, max_batch=1)
    params = sampling(max_new_tokens=256, temperature=0.8, top_k=0, top_p=1.0, repetition_penalty=1.0,
                      seed=None, stop=[], ignore_eos=False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

CheckpointOpt = Annotated[Path, typer.Option("--checkpoint", "-c", help="Model checkpoint (final.bin, sft.bin, dpo.bin, "
                                                                        "or a training state_N.bin).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: the best "
                                                                   "available).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights and KV cache: auto (bfloat16 on CUDA, else float32), "
                                                       "float32, bfloat16, float16 or float64.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for the model (default: PyTorch's, "
                                                                     "one per core).")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per reply.")]
# The numbers in these help texts are smedjan.infer.sampling's bounds (that module
# imports torch, which --help should not wait for); test_serve_cli checks they agree.
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature (finite, >= 0); a value "
                                                                     "below 1e-05 is greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens; 0 is off.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Sample among the most likely tokens holding this much "
                                                        "probability; 1 is off.")]
RepPenaltyOpt = Annotated[float, typer.Option("--repetition-penalty", help="CTRL repetition penalty for tokens "
                                                                           "already seen, between 0.01 and 100; 1 "
                                                                           "is off.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed, for reproducible sampling "
                                                               "(default: a fresh one).")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string: the text ends just before it. "
                                                                     "Repeat for several.")]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at end tokens (<|assistant_end|>, "
                                                                 "<|bos|>, ...); for benchmarks.")]
SpeculativeOpt = Annotated[bool, typer.Option("--speculative", help=(
    "Self-speculative greedy decoding (DeepSeek-V3's multi-token prediction): the model's MTP modules (trained "
    "with --n-predict N) draft N-1 tokens, one forward verifies them, and the tokens are exactly plain greedy "
    "decoding's. One sequence at a time (serve: --max-batch 1; its requests that sample decode a token a step); "
    "attention models only (a recurrent state cannot be rolled back)."))]

FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
         "repetition_penalty": "--repetition-penalty", "stop": "--stop", "seed": "--seed"}

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64"}


def resolve_dtype(name: str, device):
    import torch

    from smedjan.errors import UserError

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of auto, float32, bfloat16, float16, float64")
    return getattr(torch, DTYPES[name])


def load_engine(checkpoint: Path, device: str | None, dtype: str, threads: int | None, max_batch: int,
                context: int | None = None, speculative: bool = False):
    """(model, tokenizer, engine) for a checkpoint; every flag checked before the load
    (`speculative`: a SpeculativeEngine, one sequence at a time)."""
    import torch

    from smedjan.device import pick_device
    from smedjan.errors import UserError
    from smedjan.infer import Engine
    from smedjan.model import load_model

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}")
    dev = pick_device(device)
    dt = resolve_dtype(dtype, dev)
    model, tok, _ = load_model(checkpoint, device=dev, dtype=dt)
    if context is not None and context > model.cfg.max_seq_len:
        raise UserError(f"--context {context} is longer than the model's context of {model.cfg.max_seq_len} tokens")
    if not tok.has_chat_tokens:
        raise UserError(f"{checkpoint}: its tokenizer has no chat special tokens")
    if speculative:
        from smedjan.infer.speculative import SpeculativeEngine

        return model, tok, SpeculativeEngine(model, tok, context=context, where=str(checkpoint))
    return model, tok, Engine(model, tok, max_batch=max_batch, context=context)


def sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
             seed: int | None, stop: list[str] | None, ignore_eos: bool):
    """SamplingParams from the flags (a UserError names the flag that is out of range)."""
    from smedjan.errors import UserError
    from smedjan.infer import SamplingParams
    from smedjan.infer.sampling import SettingError

    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()),
                              ignore_eos=ignore_eos)
    except SettingError as e:
        raise UserError(f"{FLAGS.get(e.param, e.param)} {e.problem}") from None
