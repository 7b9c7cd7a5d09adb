"""smedjan: a smithy for small language models.

The library that the stage tools share: on-disk formats (`smedjan.formats`), the
tokenizer (`smedjan.tokenizer`), data loading (`smedjan.data`), the model
(`smedjan.model`), Triton kernels (`smedjan.kernels`), optimizers (`smedjan.optim`),
the training loop (`smedjan.training`) and inference (`smedjan.infer`).

    >>> from smedjan.tokenizer import Tokenizer
    >>> tok = Tokenizer.load("tokenizer.bin")      # doctest: +SKIP
"""

__version__ = "0.1.0"
