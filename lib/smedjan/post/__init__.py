"""Post-training: turn a pretrained checkpoint into a chat model, and reuse trained models.

- `formats`: SFT conversations and DPO pairs from .jsonl/.json/.parquet in the common layouts.
- `batching`: shuffled, padded example batches (resumable, DDP-sharded).
- `sft`, `dpo`, `distill`: the data, losses and evaluators the shared Trainer runs.
- `run`: the flags every post-training tool shares, and the run around the Trainer.
- `merge`, `grow`: weight-space averaging, function-preserving expansion.

    from smedjan.post.formats import load_conversations
    convs, report = load_conversations(["data/sft/instruction-data.json.zst"])
"""
