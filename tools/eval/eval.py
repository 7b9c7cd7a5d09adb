"""`smedjan eval`: loss / bits-per-byte, CORE-style tasks, HellaSwag, MMLU, long-context retrieval.

    smedjan eval -c final.bin --dataset val.bin                              # loss, perplexity, bpb
    smedjan eval -c final.bin --tasks core --max-per-task 500 --output-json eval.json
    smedjan eval -c sft.bin --tasks mmlu,arc_easy --chat
    smedjan eval -c final.bin --longctx --haystack ../shared/data/pretrain/gutenberg_nltk --heatmap niah.png
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from smedjan.cli import JsonOpt, emit, log, make_app, progress, run_app, tool, warn

app = make_app()


def _default_data_dir() -> Path:
    shared = os.environ.get("SMEDJAN_SHARED_DATA")
    return Path(shared) / "eval" if shared else Path("..") / "shared" / "data" / "eval"


def _numbers(flag: str, text: str, kind=float) -> list:
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _user(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise _user(f"{flag} is empty")
    return vals


def _user(msg: str):
    from smedjan.errors import UserError

    return UserError(msg)


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@app.command(help=(
    "Evaluate a checkpoint. Modes, combinable in one run: --dataset (loss, perplexity and bits-per-byte over a "
    "token file; special tokens count 0 bytes and, as in nanochat, their NLL is left out of bpb), --tasks "
    "(in-context-learning tasks scored by log-likelihood: CORE as nanochat runs it, HellaSwag, MMLU; accuracy, "
    "centered accuracy = (acc - baseline)/(1 - baseline), and the CORE mean), --longctx (passkey retrieval by "
    "length x depth). Multiple-choice and schema tasks pick the option with the highest mean log-prob per "
    "token; language-modeling tasks need greedy decoding to reproduce the continuation exactly. Prints a "
    "table per mode and a summary (JSON with --json); --output-json writes everything."
))
@tool("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="Checkpoint to evaluate (final.bin, "
                                             "sft.bin, dpo.bin or a state_N.bin).")],
    dataset: Annotated[Optional[Path], typer.Option(
        "--dataset", help="Token file (val.bin) for loss, perplexity and bits-per-byte.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", help="Window length for --dataset (default: the model's context).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", help="Evaluate at most about this many tokens of --dataset (default: all).")] = None,
    tasks: Annotated[Optional[list[str]], typer.Option(
        "--tasks", help="Tasks, comma-separated or repeated: core (the 22 CORE tasks; squad and coqa are "
                        "skipped when their files are absent), hellaswag (HellaSwag val, 0-shot), mmlu (5-shot), "
                        "or CORE task names such as arc_easy, copa, lambada_openai; core:hellaswag is CORE's "
                        "10-shot HellaSwag.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="Eval data folder: core/<category>/<task>.jsonl[.zst], hellaswag_val.jsonl[.zst], "
                           "mmlu_<split>.jsonl[.zst]. Default: $SMEDJAN_SHARED_DATA/eval, else "
                           "../shared/data/eval.")] = None,
    max_per_task: Annotated[Optional[int], typer.Option(
        "--max-per-task", help="Evaluate the first N items of each task, in nanochat's shuffled order "
                               "(default, 0 or negative: all).")] = None,
    mmlu_split: Annotated[str, typer.Option("--mmlu-split", help="MMLU split to evaluate: test, validation "
                                            "or dev (shots always come from dev).")] = "test",
    chat: Annotated[bool, typer.Option("--chat", help="Score through the chat template: shots as user/assistant "
                                       "turns, the answer as the assistant reply (for sft/dpo models).")] = False,
    longctx: Annotated[bool, typer.Option("--longctx", help="Run passkey needle-in-a-haystack retrieval.")] = False,
    haystack: Annotated[Optional[list[str]], typer.Option(
        "--haystack", help="Corpus text for the haystacks (file, folder or glob; repeatable). Required with "
                           "--longctx.")] = None,
    lengths: Annotated[str, typer.Option("--lengths", help="Context lengths in tokens, answer included; "
                                         "those above the model's context are skipped.")] = "256,512,1024,2048",
    depths: Annotated[str, typer.Option("--depths", help="Needle depths, fractions of the haystack "
                                        "(0 = start, 1 = end).")] = "0,0.25,0.5,0.75,1",
    needles_per_cell: Annotated[int, typer.Option("--needles-per-cell",
                                                  help="Prompts per length x depth cell.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the passkeys and haystack offsets.")] = 0,
    heatmap: Annotated[Optional[Path], typer.Option(
        "--heatmap", help="Write the length x depth accuracy heatmap PNG here (needs matplotlib, the `plot` "
                          "extra; skipped with a warning without it).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")] = 32,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or mps "
                                                  "(default: detect).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Model weights: auto (bfloat16 on CUDA, else float32), "
                                       "float32, bfloat16 or float16. Scores are float64 either way.")] = "auto",
    output_json: Annotated[Optional[Path], typer.Option(
        "--output-json", help="Write the full report (per task, per cell, settings) as JSON here.")] = None,
    json: JsonOpt = False,
) -> None:
    from smedjan.eval import report as R
    from smedjan.io import check_input_file, check_output_path

    # Every check that needs no work first.
    if dataset is None and not tasks and not longctx:
        raise _user("nothing to do: give --dataset, --tasks and/or --longctx")
    if batch_size < 1:
        raise _user(f"--batch-size {batch_size} must be at least 1")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise _user(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    for p in (output_json, heatmap):
        if p is not None:
            check_output_path(p)
    if dataset is not None:
        check_input_file(dataset, "dataset")
    depth_list = _numbers("--depths", depths)
    length_list = _numbers("--lengths", lengths, int)
    if longctx:
        if not haystack:
            raise _user("--longctx needs --haystack FILE (corpus text for the haystacks)")
        if any(not 0 <= d <= 1 for d in depth_list):
            raise _user(f"--depths {depths!r}: every depth must be within 0..1")
        if any(L < 1 for L in length_list):
            raise _user(f"--lengths {lengths!r}: lengths must be positive")
    elif haystack or heatmap:
        raise _user("--haystack and --heatmap go with --longctx")

    task_data, skipped = [], []
    if tasks:
        from smedjan.eval.tasks import load_task, resolve_tasks

        specs = resolve_tasks(tasks, mmlu_split)
        ddir = data_dir if data_dir is not None else _default_data_dir()
        for spec in specs:  # all files are read and checked before the model is loaded
            t = load_task(spec, ddir)
            if t is None:
                skipped.append(spec.label)
            else:
                task_data.append(t)
        if skipped:
            warn(f"no data file for {', '.join(skipped)} in {ddir}: not run, CORE averages the others")

    from smedjan.device import pick_device  # torch is imported only once the inputs are known good
    from smedjan.model import load_model

    dev = pick_device(device)
    model, tok, ck = load_model(checkpoint, device=dev, dtype=None)
    model = model.to(_dtype(dtype, dev))
    max_len = ck.config.max_seq_len
    if chat and task_data and not tok.has_chat_tokens:
        raise _user(f"{checkpoint}: --chat needs a tokenizer with chat tokens; this one has none")
    log(f"evaluating {checkpoint} ({ck.config.n_params() / 1e6:.2f}M parameters, context {max_len}) on {dev}")
    summary: dict = {"checkpoint": str(checkpoint), "device": str(dev)}
    full: dict = {"checkpoint": str(checkpoint), "tokenizer": tok.fingerprint, "model": ck.config.to_dict(),
                  "device": str(dev), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                  "chat": chat}
    tables = []

    if dataset is not None:
        from smedjan.data.loader import TokenFile, n_sequential_batches
        from smedjan.eval.lm import evaluate_token_file

        T = seq_len if seq_len is not None else max_len
        if not 0 < T <= max_len:
            raise _user(f"--seq-len {T} must be within 1..{max_len} (the model's context)")
        total = n_sequential_batches(TokenFile.open(dataset), batch_size, T)
        if max_tokens:
            total = min(total, max(1, max_tokens // (batch_size * T)))
        with progress("loss", total=total) as bar:
            lm = evaluate_token_file(model, tok, dataset, batch_size=batch_size, seq_len=T, max_tokens=max_tokens,
                                     device=dev, on_batch=bar.advance)
        full["lm"] = lm.summary()
        summary.update({"dataset": str(dataset), "tokens": lm.tokens, "loss": lm.loss, "perplexity": lm.perplexity,
                        "bits_per_byte": lm.bits_per_byte, "tokens_per_s": lm.tokens_per_s})

    if task_data:
        from smedjan.eval.core import core_metric, evaluate_task

        total = sum(len(t.items) if not max_per_task or max_per_task <= 0 else min(max_per_task, len(t.items))
                    for t in task_data)
        results = []
        t0 = time.monotonic()
        with progress("tasks", total=total) as bar:
            for t in task_data:
                bar.update(task=t.spec.label)
                results.append(evaluate_task(model, tok, t, max_len=max_len, batch_size=batch_size, device=dev,
                                             chat=chat, max_per_task=max_per_task, on_items=bar.advance))
        seconds = time.monotonic() - t0
        core_results = [r for r, t in zip(results, task_data) if t.spec.suite == "core"]
        core = core_metric(core_results) if core_results else None
        n_items = sum(r.n for r in results)
        tables.append(R.core_table(results, core, [r.label for r in core_results], skipped))
        full["tasks"] = [r.summary() for r in results]
        full["core"] = {"score": core, "tasks_run": [r.label for r in core_results], "not_run": skipped}
        if core is not None:
            summary.update({"core": core, "core_tasks": len(core_results)})
        summary.update({"tasks": len(results), "examples": n_items,
                        "examples_per_s": round(n_items / seconds, 2) if seconds > 0 else float("inf")})
        if json:
            summary["accuracy"] = {r.label: r.accuracy for r in results}
            summary["centered"] = {r.label: r.centered for r in results}
        truncated = sum(r.truncated for r in results)
        if truncated:
            log(f"{truncated} of {n_items} examples were cut on the left to fit the context of {max_len} tokens")

    if longctx:
        from smedjan.eval.longctx import corpus_tokens, run_longctx

        runnable = [L for L in length_list if L <= max_len]
        for L in sorted(set(length_list) - set(runnable)):
            warn(f"length {L} is longer than the model's context of {max_len} tokens: skipped")
        res = None
        if runnable:
            corpus = corpus_tokens(tok, haystack, need=2 * max(runnable))
            cells = len(runnable) * len(set(depth_list)) * needles_per_cell
            with progress("longctx", total=cells) as bar:
                res = run_longctx(model, tok, corpus, lengths=length_list, depths=depth_list,
                                  per_cell=needles_per_cell, max_len=max_len, seed=seed, batch_size=batch_size,
                                  device=dev, on_prompts=bar.advance)
            tables.append(R.longctx_table(res))
            full["longctx"] = res.summary()
            summary.update({"longctx_accuracy": res.overall, "longctx_prompts_per_s": res.prompts_per_s})
            if heatmap is not None:
                if R.heatmap(res, heatmap):
                    summary["heatmap"] = str(heatmap)
                else:
                    warn("matplotlib is not installed (pip install 'smedjan[plot]'): no heatmap written")
        else:
            summary["longctx_accuracy"] = None

    for table in tables:  # tables on stdout, unless stdout carries the JSON summary
        if json:
            log(table)
        else:
            print(table + "\n", flush=True)
    if output_json is not None:
        R.write_json(output_json, full)
        summary["output_json"] = str(output_json)
    emit(summary, json)


def main() -> None:
    run_app(app, "smedjan-eval")


if __name__ == "__main__":
    main()
