"""The training levers, applied to a model from outside its parts (torchtitan's way): what
trades compute or precision for memory, and what runs the matmuls and hot kernels.

- `--gradient-checkpointing` (`--checkpoint-layers N`: every Nth block, 0, N, 2N, ...;
  default every block): each chosen block's forward runs under non-reentrant
  `torch.utils.checkpoint`, which keeps only the block's input and recomputes the rest in
  the backward. The block is whatever the registries built, so every mixer gets it. On
  the CPU the recomputation is bit-identical, and so are the gradients.
- `--fp16-activations`: a `saved_tensors_hooks` pair stores every float32 activation
  autograd keeps in fp16, with a per-tensor power-of-two scale computed on the device
  (the largest magnitude lands at 2^15), so no tensor overflows fp16 and bf16 is never
  needed as a fallback; tensors that are already 16-bit (bf16 under autocast) stay as
  they are, and parameters (and views of them), integer tensors and tensors outside the
  graph (RoPE tables, the fused loss's gradients) are never touched.
- `--bf16-matmul`: a torch-function mode runs every matmul (linear layers, attention,
  the head) in bf16 from the float32 master weights and hands float32 back, so norms,
  softmax, residual stream and losses stay float32; replaces autocast.
- `--fp8 --fp8-recipe`: the same mode sends each eligible linear call (smedjan.kernels.fp8)
  through `torch._scaled_mm`; the embedding and the head stay high precision.
- `--kernels`: `smedjan.kernels.choose` picks the model's kernel set once.
- `--fused-ce` is a loss head (`smedjan.training.heads`), chosen by each tool's loss.

All of it acts on training forwards only (module in train mode, gradients on):
evaluation, sampling and export see the plain model in float32/bf16. The wrappers are
bound methods on the model's own modules, so parameter names, state_N.bin, DDP and
torch.compile (which traces them) are unchanged; the matmul mode is re-entered inside
each checkpointed block so the recomputation uses the same precision as the forward.
`SavedBytes` counts what autograd keeps (each storage once), whichever lever packs it.

    lv = levers_of(o)                    # one-line errors for contradictory flags
    check_device(lv, device)             # FP8 and Triton need what they need
    apply_levers(model, lv, device, compiled=o.compile)
    with SavedBytes() as saved:
        loss = model(x, y)
    print(saved.total)
"""

from __future__ import annotations

import contextlib
import os
import types
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from smedjan.errors import UserError
from smedjan.kernels import KERNEL_CHOICES, choose, use_kernels
from smedjan.kernels.fp8 import RECIPES, eligible, fp8_linear

FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Levers:
    checkpoint_every: int = 0  # 0: off; N: blocks 0, N, 2N, ... are checkpointed
    fp16_activations: bool = False
    bf16_matmul: bool = False
    fp8: str | None = None  # None or a recipe
    kernels: str = "auto"
    fused_ce: bool = False

    @property
    def any_matmul(self) -> bool:
        return self.bf16_matmul or self.fp8 is not None

    def describe(self) -> str:
        every = "every block" if self.checkpoint_every == 1 else f"every {self.checkpoint_every} blocks"
        on = [f"checkpointing {every}" if self.checkpoint_every else "", "fused CE" if self.fused_ce else "",
              "fp16 activations" if self.fp16_activations else "", "bf16 matmuls" if self.bf16_matmul else "",
              f"FP8 {self.fp8}" if self.fp8 else ""]
        return ", ".join(s for s in on if s)


def levers_of(o) -> Levers:
    """The levers a RunOptions asks for; one-line errors for flags out of range or that
    would be ignored."""
    if o.checkpoint_layers < 1:
        raise UserError(f"`checkpoint_layers` {o.checkpoint_layers} must be >= 1")
    if o.checkpoint_layers != 1 and not o.gradient_checkpointing:
        raise UserError("`checkpoint_layers` needs `gradient_checkpointing`")
    if o.kernels not in KERNEL_CHOICES:
        raise UserError(f"`kernels` {o.kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if o.fp8_recipe not in RECIPES:
        raise UserError(f"`fp8_recipe` {o.fp8_recipe!r} is not one of {', '.join(RECIPES)}")
    if o.fp8_recipe != RECIPES[0] and not o.fp8:
        raise UserError("`fp8_recipe` needs `fp8`")
    if o.fp8 and o.bf16_matmul:
        raise UserError("`fp8` and `bf16_matmul` exclude each other (FP8 runs the eligible matmuls, autocast "
                        "the rest)")
    if o.bf16_matmul and o.precision == "bf16":
        raise UserError("`bf16_matmul` replaces bf16 autocast: use it with `precision` auto or fp32")
    return Levers(checkpoint_every=o.checkpoint_layers if o.gradient_checkpointing else 0,
                  fp16_activations=o.fp16_activations, bf16_matmul=o.bf16_matmul,
                  fp8=o.fp8_recipe if o.fp8 else None, kernels=o.kernels, fused_ce=o.fused_ce)


def check_device(lv: Levers, device: torch.device, compiled: bool = False) -> None:
    """One line where the device cannot do what the levers ask."""
    if compiled and lv.checkpoint_every and lv.bf16_matmul and device.type == "cpu":
        # Inductor's CPU code for checkpointed blocks under the bf16 matmul mode reads
        # memory it never wrote (NaN or wrong losses with torch 2.13; aot_eager is right).
        raise UserError("`gradient_checkpointing` with `bf16_matmul` under `compile` is miscompiled by "
                        "torch.compile on the CPU (NaN losses); drop one of the three")
    if lv.fp8:
        if device.type != "cuda":
            raise UserError(f"`fp8` needs a CUDA GPU of compute capability 8.9 or newer (H100, L4, RTX 40); "
                            f"the device is {device}")
        cc = torch.cuda.get_device_capability(device)
        if cc < FP8_CAPABILITY:
            raise UserError(f"`fp8` needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} "
                            f"has {cc[0]}.{cc[1]}")
    if lv.kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"`kernels` triton needs a CUDA device (the device is {device}; TRITON_INTERPRET=1 runs "
                        "Triton's slow CPU interpreter)")
    if lv.kernels == "triton":
        from smedjan.kernels.launch import triton

        if triton is None:
            raise UserError("`kernels` triton: the triton package is not installed")


# ------------------------------------------------------------------------------ counting
_COUNTERS: list["SavedBytes"] = []


def _param_like(t: torch.Tensor) -> bool:
    """A parameter (a leaf that requires grad) or a view of one: kept anyway, not an activation."""
    base = t._base if t._base is not None else t
    return base.requires_grad and base.grad_fn is None


def _report(t: torch.Tensor) -> None:
    for c in _COUNTERS:
        c.add(t)


class SavedBytes:
    """While entered: the bytes of the tensors autograd saves for the backward, each storage
    counted once, parameters left out (measured after any lever packed them). Works on
    real and fake tensors (FakeTensorMode measures a large model without computing it)."""

    def __init__(self):
        self.storages: dict[int, tuple[int, tuple, torch.dtype]] = {}
        self._keep: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack_plain)

    def add(self, t: torch.Tensor) -> None:
        if _param_like(t):
            return
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.storages:
            self.storages[key] = (st.nbytes(), tuple(t.shape), t.dtype)
            self._keep.append(st)  # an address is never reused while counted

    def _pack(self, t):
        _report(t)
        return t

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.storages.values())

    def shapes(self) -> list[tuple]:
        return [s for _, s, _ in self.storages.values()]

    def __enter__(self):
        _COUNTERS.append(self)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        _COUNTERS.remove(self)
        self._keep.clear()


def _unpack_plain(t):
    return t


# ----------------------------------------------------------------------- fp16 storage
FP16_TOP = 15  # the largest magnitude is scaled to at most 2^15 (fp16 holds up to 65504)


def _compressible(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.grad_fn is not None and not _param_like(t) and t.numel() > 0


def _fp16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale in fp16, scale): scale a power of two (exact to apply) putting max |t| at
    most at 2^FP16_TOP; computed on the device, no host sync."""
    lo, hi = torch.aminmax(t)
    amax = torch.maximum(hi, -lo)
    ok = torch.isfinite(amax) & (amax > 0)
    scale = torch.where(ok, torch.exp2(torch.ceil(torch.log2(torch.where(ok, amax, 1.0))) - FP16_TOP), 1.0)
    return (t / scale).to(torch.float16), scale


class Fp16Storage:
    """The saved-tensor hooks of `--fp16-activations`, one per forward. Autograd often saves
    one tensor several times, or several views of one tensor (x and x.view(-1, d)): each
    storage is converted once and every save keeps a view of that one copy, so the fp16
    copies never cost more than the float32 originals did."""

    def __init__(self):
        # id(base) -> (weak reference to base, its fp16 copy, scale). The weak reference
        # tells a live base from a freed one whose id a new tensor took over.
        self.packed: dict[int, tuple] = {}

    def pack(self, t: torch.Tensor):
        base = t if t._base is None else t._base
        if not (_compressible(t) and base.dtype == t.dtype and base.is_contiguous() and base.storage_offset() == 0):
            _report(t)
            return t
        entry = self.packed.get(id(base))
        if entry is None or entry[0]() is not base:
            with torch.no_grad():
                entry = self.packed[id(base)] = (weakref.ref(base), *_fp16(base.detach()))
            _report(entry[1])
        _, half, scale = entry
        return half, scale, t.dtype, t.shape, t.stride(), t.storage_offset()

    @staticmethod
    def unpack(p):
        if not isinstance(p, tuple):
            return p
        half, scale, dtype, shape, stride, offset = p
        return (half.to(dtype) * scale).as_strided(shape, stride, offset)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# ------------------------------------------------------------------------ matmul modes
_BF16_OPS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
             torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum,
             F.linear, F.scaled_dot_product_attention}


def _to_bf16(a):
    return a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a


class MatmulMode(TorchFunctionMode):
    """Runs matmuls in bf16 (`bf16`) and/or eligible linear calls in FP8 (`fp8` recipe),
    except those whose weight is in `keep` (the embedding and head). Entered around a
    training forward; `reentered()` enters it only where it is not active (a checkpointed
    block's recomputation in the backward)."""

    def __init__(self, bf16: bool = False, fp8: str | None = None, keep: tuple = ()):
        super().__init__()
        self.bf16, self.fp8 = bf16, fp8
        self.keep = {id(t) for t in keep}
        self.depth = 0
        self.fp8_calls = 0  # counted for the log and the tests

    def __enter__(self):
        self.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self.depth -= 1
        return super().__exit__(*exc)

    def reentered(self):
        return self if self.depth == 0 else contextlib.nullcontext()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.fp8 and id(args[1]) not in self.keep and eligible(args[0], args[1]):
            self.fp8_calls += 1
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return fp8_linear(args[0], args[1], bias, self.fp8)
        if self.bf16 and func in _BF16_OPS and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
            out = func(*[_to_bf16(a) for a in args], **{k: _to_bf16(v) for k, v in kwargs.items()})
            return out.float() if isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 else out
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------- wrappers
def _run_block(block, x, ctx, layer):
    mode = block._lever_mode
    with mode.reentered() if mode is not None else contextlib.nullcontext():
        return type(block).forward(block, x, ctx, layer)


def _checkpointed_forward(self, x, ctx, layer):
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x, ctx, layer)
    return checkpoint(_run_block, self, x, ctx, layer, use_reentrant=False)


def _levered_forward(self, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, *args, **kwargs)
    with contextlib.ExitStack() as stack:
        if self._lever_fp16:
            stack.enter_context(Fp16Storage().hooks())
        if self._lever_mode is not None:
            stack.enter_context(self._lever_mode)
        return type(self).forward(self, *args, **kwargs)


def apply_levers(model: torch.nn.Module, lv: Levers, device: torch.device, compiled: bool = False):
    """Apply `lv` to a Transformer in place (kernels, checkpointed blocks, fp16 storage,
    matmul mode); returns the kernel set chosen. Parameters and their names are untouched."""
    kernels = choose(lv.kernels, device, compiled)
    use_kernels(model, kernels)
    mode = None
    if lv.any_matmul:
        keep = (model.tok_embeddings.weight, model.head_weight)
        mode = MatmulMode(bf16=lv.bf16_matmul, fp8=lv.fp8, keep=keep)
    for i, block in enumerate(model.layers):
        if lv.checkpoint_every and i % lv.checkpoint_every == 0:
            block._lever_mode = mode
            block.forward = types.MethodType(_checkpointed_forward, block)
    if lv.fp16_activations or mode is not None:
        model._lever_fp16, model._lever_mode = lv.fp16_activations, mode
        model.forward = types.MethodType(_levered_forward, model)
    return kernels
