"""Byte-level BPE: the `Tokenizer` (format, encode, decode) and its trainer.

    from smedjan.tokenizer import Tokenizer, train_bpe
    tok = train_bpe(open("corpus.txt"), vocab_size=8192)
    tok.save("tokenizer.bin")
    assert Tokenizer.load("tokenizer.bin").decode(tok.encode("hi")) == "hi"
"""

from smedjan.tokenizer.core import Tokenizer
from smedjan.tokenizer.train import train_bpe

__all__ = ["Tokenizer", "train_bpe"]
