"""The single source of truth for smedjan's file magics, versions, kinds and tokens.

    from smedjan.formats import constants as C
    C.TOKENIZER_MAGIC, C.SPECIAL_TOKENS, C.PRETOKENIZER_PATTERNS["llama3"]
"""

# --- binary files with a smedjan header: MAGIC (8 bytes) | u32 version | u32 len | JSON | payload
TOKENIZER_MAGIC = b"SMJTOKZR"
TOKENIZER_VERSION = 1
TOKENS_MAGIC = b"SMJTOKNS"
TOKENS_VERSION = 1
# The token array of train.bin/val.bin starts at a multiple of this, so numpy.memmap
# views it with no copy and with page-aligned reads.
TOKENS_ALIGN = 4096

# --- safetensors files: `__metadata__` carries these keys (all values are strings).
CHECKPOINT_FORMAT_VERSION = 2  # 1: the first release (flat model config, attention/feed_forward names)
KIND_TRAIN_STATE = "train_state"  # state_N.bin: weights + optimizer + RNG + data position
KIND_MODEL = "model"  # final.bin / sft.bin / dpo.bin: weights + config + tokenizer

# Which tool regenerates each kind of file (named in every "bad file" error).
REGENERATE = {
    "tokenizer": "smedjan tokenizer (or smedjan import-bpe)",
    "tokens": "smedjan prepare",
    KIND_TRAIN_STATE: "smedjan train",
    KIND_MODEL: "smedjan train (or sft, dpo, import-hf)",
}

# --- tokens
# Byte-level BPE: ids 0..255 are the 256 bytes (for trained tokenizers), merges follow,
# and the special tokens come last. Their strings never match ordinary text encoding:
# `encode()` treats them as plain text, only the chat template emits their ids.
BOS = "<|bos|>"
USER_START = "<|user_start|>"
USER_END = "<|user_end|>"
ASSISTANT_START = "<|assistant_start|>"
ASSISTANT_END = "<|assistant_end|>"
SYSTEM_START = "<|system_start|>"
SYSTEM_END = "<|system_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END, SYSTEM_START, SYSTEM_END, PAD]

# --- pre-tokenization. Each pattern is one that llama.cpp implements by name, so a
# GGUF file that names it tokenizes exactly as we do (see GGUF_PRETOKENIZER).
PRETOKENIZER_PATTERNS = {
    # Llama 3 / GPT-4 (cl100k) split: case-insensitive contractions, letters with one
    # leading non-letter, digits in groups of 1-3, punctuation runs with trailing
    # newlines, newline runs, and whitespace. Better compression than gpt2 on code and numbers.
    "llama3": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    # The original GPT-2 split (what OpenAI's GPT-2 vocabulary was trained with).
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}
DEFAULT_PRETOKENIZER = "llama3"
# llama.cpp's `tokenizer.ggml.pre` names for the same splits ("llama-bpe" selects its
# LLAMA3 pre-tokenizer with ignore_merges, which is also tiktoken's behaviour).
GGUF_PRETOKENIZER = {"llama3": "llama-bpe", "gpt2": "gpt-2"}
