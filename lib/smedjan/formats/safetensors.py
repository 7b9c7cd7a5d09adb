"""Writing safetensors files ourselves, streamed into a file object that smedjan opened.

`safetensors.torch.save_file` writes its own hidden temporary (`.tmpXXXXXX`, mode 0600)
beside the file it is given and renames it at the end: a kill leaves that temporary
where no cleanup recognises it, and the file keeps mode 0600. Writing the format
directly into `smedjan.io.atomic_path`'s temporary avoids both, needs no second copy
of the tensors in memory, and tells the writer the exact size beforehand (for the
free-space check and the disk-full message).

The layout is safetensors' own, byte for byte as `safetensors.torch.save` writes it (the
tests compare): u64 little-endian header length | JSON header padded with spaces to a
multiple of 8 | tensor data. The header lists `__metadata__` (sorted keys) then every
tensor as {dtype, shape, data_offsets}, in data order: by dtype from the widest (safetensors'
own ranking) and by name, so every tensor is aligned to its element size.

    size = safetensors_size(tensors, metadata)
    with atomic_write("model.safetensors", expected_size=size) as f:
        write_safetensors(f, tensors, metadata)
"""

from __future__ import annotations

import json
import struct
from typing import BinaryIO

import torch

# safetensors' dtype names, in the order of its Dtype enum (data is written widest first).
_DTYPES = [(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
           (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.uint16, "U16"), (torch.float16, "F16"),
           (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"), (torch.float32, "F32"),
           (torch.complex64, "C64"), (torch.float64, "F64"), (torch.int64, "I64"), (torch.uint64, "U64")]
_NAME = {dt: name for dt, name in _DTYPES}
_RANK = {dt: i for i, (dt, _) in enumerate(_DTYPES)}


def _order(tensors: dict[str, torch.Tensor]) -> list[str]:
    for name, t in tensors.items():
        if t.dtype not in _NAME:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
    return sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype], n))


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    head: dict = {}
    if metadata:
        head["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in _order(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        head[name] = {"dtype": _NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """The exact size in bytes of the file `write_safetensors` writes."""
    return len(_header(tensors, metadata)) + sum(t.numel() * t.element_size() for t in tensors.values())


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device, any layout) and string `metadata` as safetensors to `f`."""
    f.write(_header(tensors, metadata))
    for name in _order(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            f.write(memoryview(t.view(torch.uint8).numpy()))  # little-endian hosts, as safetensors
