"""Evaluation: numbers comparable with nanochat's (val bpb, CORE) and long-context retrieval.

- `lm`: loss, perplexity and bits-per-byte over a token file (val.bin).
- `tasks`: the CORE task table (few-shot counts, delimiters, random baselines), HellaSwag
  and MMLU, and the checked loading of their JSONL files.
- `core`: few-shot prompts, batched log-likelihood scoring, accuracy, centered accuracy, CORE.
- `longctx`: passkey needle-in-a-haystack prompts by length x depth, and their scoring.
- `report`: tables, the JSON report, the heatmap.

    from smedjan.eval.tasks import resolve_tasks, load_task
    from smedjan.eval.core import evaluate_task, core_metric
    results = [evaluate_task(model, tok, load_task(s, "../shared/data/eval"), max_len=2048)
               for s in resolve_tasks(["arc_easy", "copa"])]
    core_metric(results)
"""
