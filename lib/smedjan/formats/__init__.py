"""Every on-disk format of smedjan, one module each; constants live in `constants`.

    from smedjan.formats import constants as C
    from smedjan.formats.binfile import read_header
    meta, offset = read_header("train.bin", C.TOKENS_MAGIC, C.TOKENS_VERSION, "token file")
"""
