"""The training loop every training tool shares: `train` now; `sft`, `dpo` and
distillation reuse it with another batch source and loss function.

What a tool supplies:
- `model`: the raw `nn.Module`, already on its device (the Trainer wraps it in DDP
  and/or `torch.compile` itself and always saves the raw module's weights).
- `optimizer`: from `smedjan.optim.build_optimizer` (groups carry `peak_lr`, `names`).
- `schedule`: step -> LR multiplier (`smedjan.training.schedule.Schedule`);
  each group's lr = peak_lr * schedule(step).
- `source`: a `BatchSource`: `next_batch()` returns any structure of tensors (moved to
  the device by the Trainer), `state_dict()` a JSON-able dict, `load_state_dict(d)`
  continues the same stream. Called `grad_accum` times per step.
- `loss_fn(model, batch) -> (loss, metrics)`: loss is the scalar to minimise (a mean
  over the batch); metrics is a dict of floats or 0-d tensors, averaged over
  micro-batches and ranks and logged; the key "tokens" (tokens processed) is summed
  instead and gives tok/s and MFU.
- optional `evaluator(model) -> dict` (run under no_grad, eval mode, autocast; under
  DDP it must reduce over ranks itself): called every `eval_every` steps; its
  `monitor` key (default val_loss) drives `best.bin` and early stopping (`patience`).
- optional `sampler(model, step) -> str`, printed every `sample_every` steps.
- `TrainerConfig.tool` ("train", "sft", ...): recorded in every state; `resume` refuses
  a state of another tool.

What the Trainer does for all of them:
- each step: forward/backward over `grad_accum` micro-batches (DDP syncs gradients on
  the last one only), gradient norm, then a check: a step whose loss or gradient norm
  is not finite is skipped (no update; the step and its data still count, so the
  schedule and the data stream stay where an uninterrupted run would be) and counted;
  `max_bad_steps` such steps in a row stop the run (reason "diverged") without writing
  anything, so the last state_N.bin is the last good one. Otherwise the gradients are
  clipped to `grad_clip` (when above) and the optimizer steps.
- `state_N.bin` every `checkpoint_every` steps (model, optimizer, RNG, source state,
  counters; atomic; only the newest `keep` kept), `final.bin` (weights + config +
  tokenizer) at the end, `best.bin` whenever the monitored metric improves;
  `metrics.jsonl` (one line per step); a progress bar with loss, lr, tok/s (and MFU
  when `peak_flops` is set). Only rank 0 writes or logs.
- SIGINT / SIGTERM: the current step finishes, a state is written, `fit` returns with
  reason "interrupted" (SIGINT; tools exit 130) or "terminated" (SIGTERM; exit 0).
  A second signal aborts at once (atomic writes still leave no partial file).
- `resume(path)`: restores everything; the continued run repeats the uninterrupted
  run's losses bit for bit (same device, threads and flags).
- optional `extras` (`smedjan.training.regularisers.Extras`): gradient noise after the
  clip, the EMA update after the optimizer step; validation, best.bin and final.bin see
  the EMA's weights; its averages go into every state. ReLoRA's adapters train beside
  the model (`after_step` merges them every N steps); validation, best.bin and final.bin
  see the merged weights; the adapters go into every state.

    trainer = Trainer(model, opt, Schedule("cosine", 1000, 100), loader, lm_loss,
                      TrainerConfig(tool="train", steps=1000, checkpoint_dir=Path("ckpt")),
                      tokenizer=tok, model_config=cfg, run_config={"lr": 3e-4})
    trainer.resume("ckpt/state_500.bin")      # optional
    result = trainer.fit()                    # TrainResult(reason="done", step=1000, ...)
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from smedjan.console import Terminated, log, progress, warn
from smedjan.errors import UserError
from smedjan.formats import constants as C
from smedjan.formats.checkpoint import save_checkpoint
from smedjan.training.dist import DistContext
from smedjan.training.files import MetricsLog, clean_stale_temps, hold_run_folder, rotate_states
from smedjan.training.regularisers import Extras
from smedjan.training.state import (LoadedState, apply_train_state, config_diff, list_states, read_train_state,
                                    save_train_state, state_path)


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]


@dataclass
class TrainerConfig:
    tool: str  # which tool's run this is: recorded in states, checked on resume
    steps: int  # optimizer steps of the whole run (a resumed run counts from 0 too)
    checkpoint_dir: Path | None = None  # None: write nothing (benchmarks, tests)
    checkpoint_every: int = 1000  # 0: a state only at the end (or on a signal)
    keep: int = 3  # newest states kept; 0 keeps all
    final_path: Path | None = None  # default checkpoint_dir / "final.bin"
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0: never clip (the norm is still checked for NaN/Inf)
    max_bad_steps: int = 8  # non-finite steps in a row that stop the run
    eval_every: int = 0  # 0: at each checkpoint interval
    patience: int = 0  # evaluations without improvement before stopping; 0: never
    monitor: str = "val_loss"  # evaluator key for best.bin / early stopping (lower is better)
    sample_every: int = 0
    amp_dtype: torch.dtype | None = None  # autocast dtype (bf16 on CUDA)
    compile: bool = False
    flops_per_token: float = 0.0  # training FLOPs per token, for MFU
    peak_flops: float = 0.0  # per device; 0: MFU not shown
    handle_signals: bool = True
    fault_steps: frozenset = frozenset()  # tests and drills: make these steps' loss NaN (1-based)
    fsdp: bool = False  # the model is sharded (smedjan.training.fsdp): no DDP, whole states gathered to save


@dataclass
class TrainResult:
    reason: str  # done | early_stop | interrupted | terminated | diverged
    step: int
    last_loss: float = math.nan
    skipped_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last_state: Path | None = None
    final: Path | None = None
    best: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    message: str = ""


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in tuples, lists and dicts, moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class _NullBar:
    def update(self, *a, **k) -> None:
        pass


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float],
                 source: BatchSource, loss_fn: LossFn, cfg: TrainerConfig, *, tokenizer=None, model_config=None,
                 run_config: dict | None = None, evaluator: Callable[[nn.Module], dict] | None = None,
                 sampler: Callable[[nn.Module, int], str] | None = None, dist: DistContext | None = None,
                 loggers: tuple = (), extras=None):
        assert cfg.steps >= 0 and cfg.grad_accum >= 1 and cfg.max_bad_steps >= 1
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.source, self.loss_fn, self.cfg = source, loss_fn, cfg
        self.tokenizer, self.model_config = tokenizer, model_config
        self.run_config = run_config or {}
        self.evaluator, self.sampler, self.loggers = evaluator, sampler, loggers
        # EMA, gradient noise (smedjan.training.regularisers.Extras; no-ops by default)
        self.extras = extras if extras is not None else Extras()
        self.dist = dist or DistContext(device=next(model.parameters()).device)
        self.device = next(model.parameters()).device
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.train_model: nn.Module = model
        self._ddp = None
        if self.dist.enabled and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self._ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_model = self._ddp
        if cfg.compile:
            if hasattr(model, "rope"):
                # Fill the Transformer's RoPE table cache now: traced while empty, the
                # graph would guard on it and recompile on the second step.
                model.rope(self.device)
            self.train_model = torch.compile(self.train_model)
        self.folder = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
        self.writes = self.folder is not None and self.dist.is_main
        # Counters, all saved in every state.
        self.step = 0
        self.bad_total = 0
        self.bad_in_a_row = 0
        self.tokens = 0
        self.best: dict = {}  # {"step": n, <monitor>: value, ...} of the best evaluation
        self.evals_since_best = 0
        self.resumed_from: int | None = None
        self.last_state: Path | None = None
        self._stop_signal = 0
        self._metrics: MetricsLog | None = None

    # ------------------------------------------------------------------ resume
    def trainer_state(self) -> dict:
        return {"step": self.step, "bad_total": self.bad_total, "bad_in_a_row": self.bad_in_a_row,
                "tokens": self.tokens, "best": self.best, "evals_since_best": self.evals_since_best}

    def resume(self, state: str | Path | LoadedState) -> LoadedState:
        """Continue from a state_N.bin of the same tool, model config and tokenizer."""
        st = state if isinstance(state, LoadedState) else read_train_state(state, self.cfg.tool)
        path = st.ck.path
        if self.model_config is not None:
            diff = config_diff(st.ck.config, self.model_config)
            if diff:
                raise UserError(f"{path}: was saved for another model config ({'; '.join(diff[:3])}); "
                                "resume with the same --size and architecture flags")
        if self.tokenizer is not None and st.ck.fingerprint != self.tokenizer.fingerprint:
            raise UserError(f"{path}: made with tokenizer {st.ck.fingerprint}, this run's tokenizer is "
                            f"{self.tokenizer.fingerprint}")
        if st.step > self.cfg.steps:
            raise UserError(f"{path}: is at step {st.step}, past this run's {self.cfg.steps} steps; raise --steps")
        self.source.load_state_dict(st.source)
        apply_train_state(st, self.model, self.optimizer)
        self.extras.load(st.ck)
        t = st.trainer
        try:
            self.step, self.bad_total, self.bad_in_a_row = int(t["step"]), int(t["bad_total"]), int(t["bad_in_a_row"])
            self.tokens, self.best, self.evals_since_best = int(t["tokens"]), dict(t["best"]), int(t["evals_since_best"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: trainer counters missing or corrupt") from None
        assert self.step == st.step, (self.step, st.step)
        self.resumed_from = st.step
        self.last_state = Path(path)
        return st

    # -------------------------------------------------------------------- step
    def _autocast(self):
        if self.cfg.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.cfg.amp_dtype)

    def train_step(self) -> dict:
        """One optimizer step (or a skipped one); returns its record for metrics.jsonl."""
        cfg, step = self.cfg, self.step
        lr_mult = self.schedule(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["peak_lr"] * lr_mult
        if hasattr(self.optimizer, "before_step"):  # the step's momentum, weight decay (smedjan.optim.common)
            self.optimizer.before_step(step)
        if hasattr(self.loss_fn, "set_step"):  # a loss weighted by the step (multi-token prediction's λ)
            self.loss_fn.set_step(step)
        vdtype = torch.float32 if self.device.type == "mps" else torch.float64
        loss_sum = torch.zeros((), device=self.device, dtype=vdtype)
        tokens = 0.0
        extra: dict[str, Any] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(self.source.next_batch(), self.device)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (last or self._ddp is None) else self._ddp.no_sync()
            if cfg.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self._autocast():
                    loss, metrics = self.loss_fn(self.train_model, batch)
                if step + 1 in cfg.fault_steps:  # numbered as in metrics.jsonl (1 = the first step)
                    loss = loss * math.nan
                (loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                if k == "tokens":
                    tokens += float(v)
                else:
                    extra[k] = extra.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else float(v))
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
        # FSDP: the norm of sharded (DTensor) gradients is a DTensor of the global norm; clip with it
        clip_norm, norm = norm, (norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        keys = sorted(extra)
        # One vector, one all-reduce, one host sync per step: loss, norm, stop flag, tokens, extras.
        vals = torch.stack([loss_sum / cfg.grad_accum, norm.to(vdtype),
                            torch.tensor(float(self._stop_signal != 0), dtype=vdtype, device=self.device),
                            torch.tensor(tokens, dtype=vdtype, device=self.device),
                            *[torch.as_tensor(extra[k], device=self.device).to(vdtype) / cfg.grad_accum for k in keys]])
        self.dist.all_reduce_sum(vals)
        loss_v, norm_v, stop_v, tokens_v, *extra_v = vals.tolist()
        W = self.dist.world_size
        loss_v, norm_v = loss_v / W, norm_v / W
        finite = math.isfinite(loss_v) and math.isfinite(norm_v)
        if finite:
            if cfg.grad_clip > 0 and norm_v > cfg.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(self.params, cfg.grad_clip, clip_norm, foreach=True)
            self.extras.before_update(self.params, step)
            self.optimizer.step()
            self.extras.after_update()
            self.bad_in_a_row = 0
        else:
            self.bad_total += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        reported = {}
        if finite and hasattr(self.optimizer, "after_step"):
            # An optimizer that needs more than the gradient (Sophia's Hessian estimate) gets the
            # model and the last micro-batch; what it reports is logged with the step.
            with self._autocast():
                reported = self.optimizer.after_step(self.train_model, batch, step) or {}
        self.step += 1
        self.extras.after_step(self.step, self.optimizer)  # ReLoRA's merges (a function of the step)
        self.tokens += int(tokens_v)
        if stop_v > 0 and not self._stop_signal:
            self._stop_signal = signal.SIGTERM  # another rank was signalled
        rec = {"step": self.step, "loss": loss_v, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm_v,
               "tokens": int(tokens_v), "skipped": self.bad_total}
        if not finite:
            rec["bad_step"] = True
        rec.update({k: v / W for k, v in zip(keys, extra_v)})
        rec.update(reported)
        if self.step == 1 and self.dist.enabled:  # what this rank's optimizer holds (1/N under FSDP)
            from smedjan.training.fsdp import optimizer_state_bytes

            rec["optim_state_bytes"] = optimizer_state_bytes(self.optimizer)
        return rec

    # -------------------------------------------------------------- side jobs
    def evaluate(self) -> dict:
        assert self.evaluator is not None
        with self.extras.final_weights():  # validation and best.bin see the EMA's weights, if any
            return self._evaluate()

    def _evaluate(self) -> dict:
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                out = dict(self.evaluator(self.model))
        finally:
            self.model.train()
        mon = out.get(self.cfg.monitor)
        if mon is not None and math.isfinite(mon):
            if not self.best or mon < self.best[self.cfg.monitor]:
                self.best = {"step": self.step, **out}
                self.evals_since_best = 0
                weights = self._model_state()  # a collective under FSDP
                if self.writes:
                    self._save_model(self.folder / "best.bin", {"best": self.best}, weights)
            else:
                self.evals_since_best += 1
        return out

    def _model_state(self) -> dict:
        """The whole weights (FSDP: gathered to rank 0's CPU; every rank must call it)."""
        if self.cfg.fsdp:
            from smedjan.training.fsdp import full_model_state

            return full_model_state(self.model)
        return self.model.state_dict()

    def _save_model(self, path: Path, meta: dict, weights: dict) -> None:
        save_checkpoint(path, weights, kind=C.KIND_MODEL, config=self.model_config,
                        tokenizer=self.tokenizer,
                        meta={"tool": self.cfg.tool, "step": self.step, "run_config": self.run_config, **meta})

    def save_state(self) -> Path | None:
        """state_<step>.bin (rank 0 writes; every rank waits for it)."""
        path = None
        extra = self.extras.state()  # (a collective under FSDP, as below)
        whole = {}
        if self.cfg.fsdp:  # gathered on every rank's call, kept by rank 0
            from smedjan.training.fsdp import full_optimizer_state

            whole = {"model_state": self._model_state(),
                     "optimizer_state": full_optimizer_state(self.model, self.optimizer)}
        if self.writes:
            path = state_path(self.folder, self.step)
            save_train_state(path, model=self.model, optimizer=self.optimizer, model_config=self.model_config,
                             tokenizer=self.tokenizer, tool=self.cfg.tool, step=self.step,
                             trainer=self.trainer_state(), source=self.source.state_dict(),
                             run_config=self.run_config, world_size=self.dist.world_size, **whole,
                             extra=extra)
            rotate_states(self.folder, self.step, self.cfg.keep)
            self.last_state = path
        self.dist.barrier()
        return path

    def _sample(self) -> None:
        self.model.eval()
        try:
            with torch.no_grad():
                text = self.sampler(self.model, self.step)
        finally:
            self.model.train()
        if self.dist.is_main:
            log(f"sample at step {self.step}: {text!r}")

    # --------------------------------------------------------------- signals
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal:  # a second signal: stop waiting for the step to end
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        self._stop_signal = signum
        if self.dist.is_main:
            log(f"smedjan {self.cfg.tool}: {signal.Signals(signum).name}: finishing step {self.step + 1}, then "
                "writing a checkpoint (send it again to abort now)")

    @contextlib.contextmanager
    def _signals(self):
        if not self.cfg.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -------------------------------------------------------------------- fit
    def _prepare_folder(self) -> None:
        if not self.writes:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        stale = clean_stale_temps(self.folder)
        if stale:
            log(f"removed {len(stale)} temporary file(s) left by an interrupted run in {self.folder}")
        later = [s for s, _ in list_states(self.folder) if s > self.step]
        if later:
            warn(f"{self.folder} already holds states of another run (up to state_{max(later)}.bin); "
                 "this run replaces them as it reaches their steps")
        self._metrics = MetricsLog(self.folder / "metrics.jsonl", self.resumed_from)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def fit(self) -> TrainResult:
        with hold_run_folder(self.folder if self.writes else None):  # one run per folder
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        self._prepare_folder()
        self.model.train()
        eval_every = cfg.eval_every or cfg.checkpoint_every
        t_start = time.perf_counter()
        reason, last_rec, last_eval, saved_at, evaluated_at = "done", {}, {}, self.resumed_from, None
        save_pending = False
        bar_cm = progress(f"{cfg.tool}", total=cfg.steps) if self.dist.is_main else contextlib.nullcontext(_NullBar())
        try:
            with self._signals(), bar_cm as bar:
                bar.update(completed=self.step)
                while self.step < cfg.steps:
                    t0 = time.perf_counter()
                    rec = self.train_step()
                    dt = time.perf_counter() - t0
                    rec["tok_s"] = rec["tokens"] / dt if dt > 0 else 0.0
                    if cfg.peak_flops and cfg.flops_per_token:
                        rec["mfu"] = rec["tok_s"] * cfg.flops_per_token / (cfg.peak_flops * self.dist.world_size)
                    last_rec = rec
                    if rec.get("bad_step") and self.bad_in_a_row >= cfg.max_bad_steps:
                        self._log_record(rec, bar)
                        reason = "diverged"
                        break
                    if self.evaluator is not None and self._due(eval_every):
                        last_eval = self.evaluate()
                        evaluated_at = self.step
                        rec.update(last_eval)
                    self._log_record(rec, bar)
                    # A state is written only after a good step: one due during a run of
                    # skipped steps waits for the next good one (or the stop, which writes none).
                    save_pending = save_pending or self._due(cfg.checkpoint_every)
                    if save_pending and self.bad_in_a_row == 0:
                        self.save_state()
                        saved_at, save_pending = self.step, False
                    if self.sampler is not None and self._due(cfg.sample_every):
                        self._sample()
                    if evaluated_at == self.step and cfg.patience and self.evals_since_best >= cfg.patience:
                        reason = "early_stop"
                        break
                    if self._stop_signal:
                        reason = "interrupted" if self._stop_signal == signal.SIGINT else "terminated"
                        break
                if reason != "diverged":
                    if reason in ("done", "early_stop") and self.evaluator is not None and evaluated_at != self.step:
                        last_eval = self.evaluate()
                        evaluated_at = self.step
                        if self._metrics is not None:
                            self._metrics.write({"step": self.step, **last_eval})
                    if saved_at != self.step:
                        self.save_state()
                final = None
                if reason in ("done", "early_stop") and self.folder:
                    # final.bin holds the EMA's weights, if any (inside: the state dict aliases them)
                    with self.extras.final_weights():
                        weights = self._model_state()  # a collective under FSDP
                        if self.writes:
                            final = cfg.final_path or self.folder / "final.bin"
                            self._save_model(final, {"reason": reason, "best": self.best, "last_eval": last_eval,
                                                     "train_loss": last_rec.get("loss")}, weights)
                self.dist.barrier()
        finally:
            if self._metrics is not None:
                self._metrics.close()
            for lg in self.loggers:
                lg.close()
        result = TrainResult(reason=reason, step=self.step, last_loss=last_rec.get("loss", math.nan),
                             skipped_steps=self.bad_total, tokens=self.tokens, seconds=time.perf_counter() - t_start,
                             last_state=self.last_state, final=final, best=self.best, last_eval=last_eval)
        if reason == "diverged":
            where = (f"the last good checkpoint is {self.last_state}" if self.last_state
                     else "no checkpoint was written before it")
            result.message = (f"stopped at step {self.step}: {self.bad_in_a_row} steps in a row had a non-finite loss "
                              f"or gradient ({self.bad_total} in all); {where}. Lower --lr, raise --warmup, "
                              "or check the data")
        return result

    def _log_record(self, rec: dict, bar) -> None:
        if self._metrics is not None:
            self._metrics.write(rec)
        if self.dist.is_main:
            for lg in self.loggers:
                lg.log(rec, self.step)
            fields = {"loss": rec["loss"], "lr": rec["lr"], "tok/s": round(rec["tok_s"])}
            if "mfu" in rec:
                fields["mfu"] = f"{100 * rec['mfu']:.1f}%"
            if self.bad_total:
                fields["skipped"] = self.bad_total
            if self.cfg.monitor in rec:
                fields[self.cfg.monitor] = rec[self.cfg.monitor]
            bar.update(completed=self.step, **fields)
