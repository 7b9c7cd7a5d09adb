"""The export stage: GGUF for llama.cpp, and Hugging Face Llama folders in and out.

- `gguf.export_gguf`: checkpoint or HF folder -> GGUF v3 (f32, q8_0, q4_0), tokenizer and
  chat template embedded, Q/K rows permuted for llama.cpp's RoPE layout.
- `quant`: reference q8_0 / q4_0 block quantizers, bit-exact with ggml.
- `hf_write.export_hf` / `hf_write.import_hf`: smedjan checkpoint <-> HF Llama folder
  (`hf_config`: config.json mapping, `hf_read`: reading folders, `hf_tokenizer`:
  tokenizer.json import).
- `names.external_names`: every tensor's HF or GGUF name, as the model's parts give them.
- `load.load_source`: what they all read (checkpoint or HF folder, checked tensor by tensor).

    from smedjan.export import export_gguf
    summary = export_gguf("final.bin", "model-q4_0.gguf", quant="q4_0")
"""

from __future__ import annotations


def export_gguf(*args, **kwargs) -> dict:
    """See `smedjan.export.gguf.export_gguf` (imported lazily: it pulls in the gguf package)."""
    from smedjan.export.gguf import export_gguf as _export

    return _export(*args, **kwargs)


__all__ = ["export_gguf"]
