"""Tokenizer stage tools: tokenizer, import-bpe, tokenizer-export, tokenizer-info, encode, decode."""
