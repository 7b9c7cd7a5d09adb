"""`adamw-8bit`: AdamW whose two moments are stored block-wise quantised to 8 bits.

Each moment of a tensor with at least MIN_QUANTIZED elements is kept as one uint8 code
per element plus one float32 absmax per block of BLOCK (256) elements: about 2.03 bytes
per parameter for both moments instead of 8. A code indexes a 256-entry dynamic map
(Dettmers et al.): the value's magnitude relative to its block's absmax is stored on a
log scale, one decade per exponent level from 1e-7 to 1, with more mantissa steps in the
higher decades (signed for the first moment, unsigned, so twice as fine, for the second;
a signed round trip errs by at most 0.00703 x absmax). Each step dequantises, applies
AdamW in float32 and requantises to the nearest code. Smaller tensors (norm gains,
scalars) keep float32 moments. Own code, plain PyTorch: CPU, CUDA and MPS alike.

    opt = build(param_groups(model, 0.1), OptimizerSettings(lr=3e-4), torch.device("cpu"))
    codes, absmax = quantize(x, SIGNED)      # uint8 [x.numel()], float32 [ceil(numel / 256)]
    x2 = dequantize(codes, absmax, SIGNED, x.shape)
"""

from __future__ import annotations

import math

import torch

from smedjan.optim.adamw import BETA1, BETA2, EPS, adam_groups, step_schedules
from smedjan.optim.common import Scheduled, with_grads

BLOCK, MIN_QUANTIZED = 256, 4096


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted code values in [-1, 1] (signed) or [0, 1]: 0, 1 and, in decade i
    (10^(i-7)..10^(i-6), i = 0..6), the midpoints of 2^i (signed: also negated) or 2^(i+1)
    equal steps: 127 magnitudes signed, 254 unsigned."""
    values = [0.0, 1.0]
    for i in range(7):
        steps = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += mids + ([-v for v in mids] if signed else [])
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


SIGNED, UNSIGNED = dynamic_map(True), dynamic_map(False)
_maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _map(code: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code values, midpoints between neighbours) on `device`, cached."""
    key = (id(code), str(device))
    if key not in _maps:
        c = code.to(device)
        _maps[key] = (c, (c[1:] + c[:-1]) / 2)
    return _maps[key]


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x flattened, zero-padded to whole blocks, as [n_blocks, BLOCK] float32."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [numel], float32 absmax [n_blocks]): each value's nearest code value
    after dividing by its block's absmax."""
    blocks = _blocks(x)
    absmax = blocks.abs().amax(dim=1)
    values, mids = _map(code, x.device)
    normed = blocks / absmax.clamp_min(1e-30)[:, None]
    idx = torch.bucketize(normed, mids)  # nearest: the count of midpoints below the value
    return idx.to(torch.uint8).view(-1)[: x.numel()], absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape) -> torch.Tensor:
    """float32 tensor of `shape` from codes and block absmaxes."""
    values, _ = _map(code, codes.device)
    n = codes.numel()
    pad = (-n) % BLOCK
    idx = codes.long()
    if pad:
        idx = torch.cat([idx, idx.new_zeros(pad)])
    return (values[idx].view(-1, BLOCK) * absmax[:, None]).view(-1)[:n].view(shape)


class AdamW8bit(Scheduled, torch.optim.Optimizer):
    def __init__(self, groups: list[dict], *, betas=(BETA1, BETA2), eps: float = EPS):
        super().__init__(groups, dict(betas=betas, eps=eps))

    def state_shape(self, key: str, param: torch.Tensor) -> tuple[int, ...]:
        if param.numel() < MIN_QUANTIZED:
            return tuple(param.shape)
        # quantised moments: one code per element (flat), one absmax per block
        return (-(-param.numel() // BLOCK),) if key.endswith("_absmax") else (param.numel(),)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "AdamW8bit takes no closure"
        for g in self.param_groups:
            lr, wd, eps = g["lr"], g["weight_decay"], g["eps"]
            beta1, beta2 = g["betas"]
            params, grads, states = with_grads(g, self.state)
            for p, grad, st in zip(params, grads, states):
                quantized = p.numel() >= MIN_QUANTIZED
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    for key, code in (("exp_avg", SIGNED), ("exp_avg_sq", UNSIGNED)):
                        zero = torch.zeros_like(p, dtype=torch.float32)
                        if quantized:
                            st[key], st[key + "_absmax"] = quantize(zero, code)
                        else:
                            st[key] = zero
                st["step"] += 1
                t = float(st["step"])
                if quantized:
                    m = dequantize(st["exp_avg"], st["exp_avg_absmax"], SIGNED, p.shape)
                    v = dequantize(st["exp_avg_sq"], st["exp_avg_sq_absmax"], UNSIGNED, p.shape)
                else:
                    m, v = st["exp_avg"], st["exp_avg_sq"]
                g32 = grad.float()
                m.lerp_(g32, 1 - beta1)
                v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
                p32 = p.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                p32.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                p.copy_(p32)
                if quantized:
                    st["exp_avg"], st["exp_avg_absmax"] = quantize(m, SIGNED)
                    st["exp_avg_sq"], st["exp_avg_sq_absmax"] = quantize(v, UNSIGNED)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter's dtype: the codes must stay uint8, the moments float32
        for p, st in self.state.items():
            for key, v in list(st.items()):
                if key in ("exp_avg", "exp_avg_sq") and p.numel() >= MIN_QUANTIZED:
                    st[key] = v.to(torch.uint8) if v.dtype != torch.uint8 else v
                elif isinstance(v, torch.Tensor) and key != "step":
                    st[key] = v.float()


def build(groups: list[dict], s, device: torch.device) -> torch.optim.Optimizer:
    groups = adam_groups(groups, s)
    betas = (BETA1 if s.beta1 is None else s.beta1, BETA2 if s.beta2 is None else s.beta2)
    opt = AdamW8bit(groups, betas=betas, eps=EPS if s.eps is None else s.eps)
    opt.step_schedules = step_schedules(s)
    return opt
