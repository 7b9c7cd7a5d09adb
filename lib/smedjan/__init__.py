"""smedjan: a smithy for small language models.

The library that the stage tools share: on-disk formats (`smedjan.formats`), the
tokenizer (`smedjan.tokenizer`), data loading (`smedjan.data`), the model built from
parts (`smedjan.model`), optimizers (`smedjan.optim`), the training driver and loop
(`smedjan.training`), post-training (`smedjan.post`), export (`smedjan.export`),
evaluation (`smedjan.eval`) and inference (`smedjan.infer`). Library code reports
through `smedjan.console`; `smedjan.cli` is the tools' layer and is never imported here.

    >>> from smedjan.tokenizer import Tokenizer
    >>> tok = Tokenizer.load("tokenizer.bin")      # doctest: +SKIP
"""

__version__ = "0.1.0"
