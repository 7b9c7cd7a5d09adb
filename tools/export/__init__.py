"""Export stage tools: export-gguf, import-hf, export-hf."""
