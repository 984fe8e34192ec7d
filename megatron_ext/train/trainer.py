"""The Trainer: setup -> resume -> (train_step, evaluate, save)* -> summary, TorchTitan's shape.

One optimizer step = `grad_accum` micro-steps per data-parallel rank; global batch = micro x grad_accum x dp.
Everything a step depends on is a function of (weights, optimizer state, step, consumed samples, RNG state, the
precision recipe's module state), all of which the checkpoint holds, so a resumed run reproduces an uninterrupted
one bit for bit (same layout, CPU).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from hibari.config import dump_config
from hibari.errors import HibariError
from megatron_ext.train.config import TrainConfig, check_resume_architecture
from megatron_ext.train.signals import INTERRUPT, NONE, PREEMPT, StopSignals


class TrainingError(HibariError):
    """The run itself went wrong (non-finite loss, ...): one line, non-zero exit."""


STOP_NAMES = {NONE: None, PREEMPT: "preempted", INTERRUPT: "interrupted"}


class Trainer:
    """One rank of a training run. `fit()` runs setup, resume and the loop; the pieces are public for tests."""

    def __init__(self, cfg: TrainConfig, model_args, layout, grad_accum: int, dist_info, build_engine):
        self.cfg, self.model_args, self.layout, self.accum, self.info = cfg, model_args, layout, grad_accum, dist_info
        self._build_engine = build_engine
        self.rank0 = dist_info.rank == 0
        self.run_dir = Path(cfg.run.dir)
        self.step = 0
        self.consumed = 0
        self.hf_config = None
        self.resumed_from: str | None = None
        self.losses: dict[int, float] = {}
        self.val_losses: dict[int, float] = {}
        self.valid_sets: dict = {}  # data.valid: {name: dataset}
        self.precision_schedule = None
        self.stop_reason = NONE
        self.signals = StopSignals(announce=self.rank0)

    def _say(self, text: str, err: bool = False) -> None:
        if self.rank0:
            print(f"hibari: {text}", file=sys.stderr if err else sys.stdout, flush=True)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from megatron_ext.train.checkpoint import Checkpointer, file_barrier
        from megatron_ext.train.data import StepBatches
        from megatron_ext.train.lr import lr_at
        from megatron_ext.train.optim import build_optimizer
        from parallel import peak_flops

        cfg, t = self.cfg, self.cfg.train
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        file_barrier()
        # one pid file per rank, the pid alone: operators (and the failure tests) can find and signal a given rank
        pid_dir = self.run_dir / "pids"
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"rank_{self.info.rank:05d}.pid").write_text(f"{os.getpid()}\n")

        self.engine = self._build_engine(self.model_args, self.layout, cfg, self.info)
        self.optimizer = build_optimizer(self.engine.model_parts, cfg.optim, lr=lr_at(0, cfg.lr, t.steps),
                                         device=self.engine.device)
        self.ckpt = Checkpointer(self.run_dir, self.engine, self.optimizer, keep_last=cfg.checkpoint.keep_last,
                                 async_save=cfg.checkpoint.async_save)
        self.ckpt.clean_stale()
        if cfg.precision.quantized and cfg.precision.switch_at is not None:
            from megatron_ext.precision import PrecisionSchedule

            self.precision_schedule = PrecisionSchedule(cfg.precision,
                                                        planned_tokens=t.steps * t.global_batch_size * t.seq_length)
        self.precision_mode = cfg.precision.recipe
        self.peak = peak_flops(self.engine.device)  # dense bf16 peak: `mfu`, comparable across recipes
        self._recipe_peaks: dict[str, float | None] = {}  # `mfu_recipe`: the peak of the recipe's GEMM dtype
        self.flops_per_token = self.model_args.flops_per_token(t.seq_length)
        self.step_batches = StepBatches(lambda first: list(self._micro_batches(self.train_ds, first)))
        self.config_yaml = (self.run_dir / "config.yaml").read_text(encoding="utf-8") if self.rank0 else ""

    # ----------------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Continue the run's newest usable checkpoint (skipping damaged ones, with a warning), else init.from."""
        from megatron_ext.checkpoint import find_resume_point, read_model_json, read_train_state
        from megatron_ext.train.checkpoint import file_barrier
        from megatron_ext.train.data import build_datasets, build_named_valid_sets
        from megatron_ext.train.metrics import MetricsWriter
        from megatron_ext.train.tracking import build_sinks

        cfg = self.cfg
        latest, warnings = find_resume_point(self.ckpt.root)
        for w in warnings:
            self._say(f"warning: {w}", err=True)
        lr_note = None
        if latest is not None:
            # same run dir: resume everything, whatever init.from says (it only seeds a fresh run)
            check_resume_architecture(self.model_args, latest)
            self.ckpt.load(latest, with_optimizer=True, with_rng=True)
            state = read_train_state(latest)
            self.step, self.consumed = state["step"], state["consumed_samples"]
            self.hf_config = read_model_json(latest)[1].get("hf_config")
            if self.precision_schedule is not None and state.get("precision_schedule"):
                self.precision_schedule.load_state_dict(state["precision_schedule"])
            self.resumed_from = str(latest)
            self._say(f"resuming from {latest} (step {self.step})")
            lr_note = self._lr_change(state)
        elif cfg.init.from_ is not None:
            init_dir = Path(cfg.init.from_)
            self.ckpt.load(init_dir, with_optimizer=cfg.init.load_optimizer, with_rng=False,
                           allow_missing_buffers=True)
            self.hf_config = read_model_json(init_dir)[1].get("hf_config")
            self._say(f"initialised {'weights + optimizer' if cfg.init.load_optimizer else 'weights'} from "
                      f"{init_dir}")
            if cfg.init.load_train_state:
                state = read_train_state(init_dir)
                self.step, self.consumed = state["step"], state["consumed_samples"]

        if self.rank0:  # build index caches once (rank 0) before the other ranks read them
            self.train_ds, self.valid_ds = build_datasets(cfg, self.model_args.vocab_size)
            self.valid_sets = build_named_valid_sets(cfg)
        file_barrier()  # gloo, long timeout: building big index caches may outlast the NCCL timeout
        if not self.rank0:
            self.train_ds, self.valid_ds = build_datasets(cfg, self.model_args.vocab_size)
            self.valid_sets = build_named_valid_sets(cfg)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank0, tensorboard=cfg.log.tensorboard,
                                     sinks=build_sinks(cfg.log, self.run_dir, self.rank0))
        self.metrics.truncate_after(self.step)
        if lr_note is not None:
            self.metrics.log_event(lr_note)

    def _lr_change(self, state: dict) -> dict | None:
        """When train.steps / lr changed since the checkpoint, the LR of already-planned steps moves: say so."""
        from megatron_ext.train.config import LRConfig
        from megatron_ext.train.lr import lr_at

        planned, old_cfg = state.get("planned_steps"), state.get("lr")
        if planned is None or old_cfg is None or self.step >= self.cfg.train.steps:
            return None
        try:
            old = lr_at(self.step, LRConfig.model_validate(old_cfg), planned)
        except ValueError:
            return None
        new = lr_at(self.step, self.cfg.lr, self.cfg.train.steps)
        if math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0):
            return None
        self._say(f"warning: the LR schedule changed since step {self.step} was saved (train.steps {planned} -> "
                  f"{self.cfg.train.steps}): LR at step {self.step + 1} jumps {old:.4g} -> {new:.4g} "
                  f"(README: extending a run)", err=True)
        return {"event": "lr_change", "step": self.step, "old_lr": old, "new_lr": new, "old_steps": planned,
                "new_steps": self.cfg.train.steps, "time": time.time()}

    # -------------------------------------------------------------------------------------------- one step
    def _micro_batches(self, ds, first_sample: int):
        from megatron_ext.train.data import micro_batches

        t = self.cfg.train
        return micro_batches(ds, first_sample, t.global_batch_size, t.micro_batch_size, self.engine.dp_rank,
                             self.engine.dp_size, self.engine.device)

    def train_step(self) -> dict:
        """One optimizer step. Returns its pending record: loss and grad norm stay device tensors (no host sync)
        until `read_records` turns a batch of them into metrics."""
        from megatron_ext.train.lr import lr_at
        from megatron_ext.train.optim import set_lr

        t, engine = self.cfg.train, self.engine
        if self.precision_schedule is not None:
            msg = None
            for part in engine.model_parts:
                msg = self.precision_schedule.step(self.consumed * t.seq_length, part) or msg
            if msg:
                self._say(msg)
            self.precision_mode = self.precision_schedule.current_mode
        lr = lr_at(self.step, self.cfg.lr, t.steps)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        batches = [(tokens, labels, docs if t.document_mask else None)
                   for tokens, labels, docs in self.step_batches.get(self.consumed)]
        # all grad-accumulation micro-batches in one call: under PP one schedule step per optimizer step
        loss = engine.forward_backward_step(batches, before_micro_batch=self._set_rounding_context)
        grad_norm = engine.clip_grad_norm_(t.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.consumed += t.global_batch_size
        if self.step < t.steps:  # read the next step's samples (and queue their copy) while the device computes
            self.step_batches.prefetch(self.consumed)
        loss = engine.dp_mean(loss.detach().float())
        return {"step": self.step, "loss": loss, "val_loss": None, "lr": lr, "grad_norm": grad_norm,
                "consumed_samples": self.consumed, "precision": self.precision_mode,
                "model_metrics": engine.model_metrics()}  # MoE: aux_loss, z_loss, expert_load (device tensors)

    def read_records(self, pending: list[dict], elapsed_s: float) -> list[dict]:
        """Read the device values of `pending` steps (one host sync for all) into metrics records; a non-finite loss
        stops the run (before any checkpoint of it is written: every save reads first)."""
        from megatron_ext.train.metrics import max_memory_mib, mfu

        if not pending:
            return []
        t = self.cfg.train
        values = torch.stack([torch.stack([torch.as_tensor(r["loss"], dtype=torch.float32).reshape(()).cpu(),
                                           torch.as_tensor(r["grad_norm"], dtype=torch.float32).reshape(()).cpu()])
                              for r in pending]).tolist()
        step_time = elapsed_s / len(pending)
        tokens_per_step = t.global_batch_size * t.seq_length
        tps = tokens_per_step / step_time if step_time > 0 else 0.0
        world = self.info.world_size
        memory = max_memory_mib(self.engine.device)
        out = []
        for r, (loss, grad_norm) in zip(pending, values):
            if not math.isfinite(loss):
                raise TrainingError(f"step {r['step']}: loss is {loss} (lr {r['lr']:.3g}, grad norm {grad_norm:.3g}); "
                                    f"lower lr.lr or check the data")
            self.losses[r["step"]] = loss
            out.append({"step": r["step"], "loss": loss, "val_loss": r["val_loss"], "lr": r["lr"],
                        "grad_norm": grad_norm, "tokens": tokens_per_step, "consumed_samples": r["consumed_samples"],
                        "step_time_s": step_time, "tokens_per_s": tps, "tokens_per_s_per_device": tps / world,
                        "mfu": mfu(tps / world, self.flops_per_token, self.peak),
                        # against the peak of the dtype the recipe's GEMMs run in (fp8: 2x, fp4: 4x the bf16 peak)
                        "mfu_recipe": mfu(tps / world, self.flops_per_token, self._recipe_peak(r["precision"])),
                        "max_memory_mib": memory,
                        "precision": r["precision"], **{k: v for k, v in r.items() if k.startswith("val/")},
                        **{k: v.tolist() for k, v in r.get("model_metrics", {}).items()}, "time": time.time()})
        return out

    def _recipe_peak(self, mode: str) -> float | None:
        """Dense peak of the GEMM dtype of precision `mode` (a recipe; after a switch_at: bf16 peak)."""
        from parallel.flops import RECIPE_GEMM_DTYPE, peak_flops

        if mode not in self._recipe_peaks:
            self._recipe_peaks[mode] = peak_flops(self.engine.device, RECIPE_GEMM_DTYPE.get(mode, "bf16"))
        return self._recipe_peaks[mode]

    def _set_rounding_context(self, micro: int) -> None:
        """Stochastic rounding draws its noise from (seed, step, micro-batch, dp rank, layer, position): nothing
        to checkpoint, and a resumed step draws exactly what the uninterrupted one drew. Called by the engine before
        each micro-batch (under PP once per step with micro 0: the per-layer call counter then tells the
        interleaved pipeline micro-batches apart, in the schedule's fixed order)."""
        if not self.cfg.precision.quantized:
            return
        from megatron_ext.precision import set_step_context

        engine = self.engine
        for part in engine.model_parts:
            set_step_context(part, step=self.step, micro_batch=micro, dp_rank=engine.dp_rank,
                             dp_group=engine.dp_group)

    def evaluate(self, ds=None) -> float:
        """Mean validation loss over `train.eval_batches` global batches (the same ones every time) of `ds`
        (default: the blend's validation split)."""
        t, engine = self.cfg.train, self.engine
        ds = self.valid_ds if ds is None else ds
        engine.set_train(False)
        total = torch.zeros((), dtype=torch.float32, device=engine.device)  # summed on the device: one sync
        n = 0
        with torch.no_grad():
            for b in range(t.eval_batches):
                for tokens, labels, docs in self._micro_batches(ds, b * t.global_batch_size):
                    loss = engine.forward_loss(tokens, labels, docs if t.document_mask else None)
                    total += loss.detach().float().to(engine.device)
                    n += 1
        engine.set_train(True)
        return engine.dp_mean(total / n).item()

    def save(self) -> None:
        """Checkpoint the current step (model, optimizer, RNG, train state, model json, config)."""
        from megatron_ext.checkpoint import MODEL_JSON, model_json_dict

        t = self.cfg.train
        train_state = {"step": self.step, "consumed_samples": self.consumed, "tokens": self.consumed * t.seq_length,
                       "world_size": self.info.world_size, "layout": self.layout.model_dump(mode="json"),
                       "planned_steps": t.steps, "lr": self.cfg.lr.model_dump(mode="json"),
                       "precision_schedule": self.precision_schedule.state_dict() if self.precision_schedule
                       else None}
        model_json = model_json_dict(self.model_args, self.hf_config, source="hibari train", step=self.step)
        files = {MODEL_JSON: json.dumps(model_json, indent=2, ensure_ascii=False), "config.yaml": self.config_yaml}
        self.ckpt.save(self.step, train_state, files)
        if self.rank0 and self.cfg.log.plot:
            self.metrics.plot()

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """setup + resume + train until train.steps (or stop_at, or a stop signal). Returns the summary."""
        from hibari.progress import progress_bar
        from megatron_ext.eval.periodic import check_ready, eval_due

        self.setup()
        self.resume()
        cfg, t = self.cfg, self.cfg.train
        if self.rank0:
            check_ready(cfg.eval)  # a bad eval: section fails now, not at the first checkpoint
        end = t.steps if t.stop_at is None else min(t.stop_at, t.steps)
        self.engine.set_train(True)
        self.signals.install()
        try:
            with progress_bar(total=t.steps, desc="train", unit="step", enabled=self.rank0 and cfg.log.progress,
                              initial=self.step) as bar:
                pending, window_start = [], time.perf_counter()
                while self.step < end:
                    record = self.train_step()
                    validate = t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps)
                    if self.valid_ds is not None and validate:
                        record["val_loss"] = self.val_losses[self.step] = self.evaluate()
                    for name, ds in self.valid_sets.items():  # data.valid: one curve per held-out set
                        loss = self.evaluate(ds) if validate else None
                        record[f"val/{name}/loss"] = loss
                        record[f"val/{name}/ppl"] = math.exp(min(loss, 80.0)) if loss is not None else None
                    pending.append(record)
                    bar.advance(1)
                    interval = cfg.checkpoint.interval
                    save = (interval and self.step % interval == 0) or self.step == end and (
                        self.step < t.steps or cfg.checkpoint.save_final)
                    # reading values, agreeing on stop signals and polling an async save are host syncs: every
                    # log.interval steps, and before any save (a non-finite loss must stop the run before it is
                    # checkpointed); the steps between make none
                    read = save or self.step % cfg.log.interval == 0 or self.step == end
                    if read:
                        for done in self.read_records(pending, time.perf_counter() - window_start):
                            self.metrics.log(done)
                            val = done["val_loss"]
                            bar.set_postfix(f"loss {done['loss']:.4f} lr {done['lr']:.2e}" +
                                            (f" val {val:.4f}" if val is not None else ""))
                        pending, window_start = [], time.perf_counter()
                        self.stop_reason = self.signals.agreed()
                    if save or self.stop_reason:
                        self.save()
                        if not self.stop_reason and eval_due(cfg.eval, self.step, t.steps):
                            self.downstream_eval()
                    elif read:
                        self.ckpt.poll()
                    if self.stop_reason:
                        break
            self.ckpt.wait()
        finally:
            self.signals.uninstall()
            self.metrics.close()
        if self.stop_reason == PREEMPT:
            self._say(f"{self.signals.signal_name or 'stop signal'}: saved step {self.step}, stopping")
        if self.rank0 and cfg.log.plot:
            self.metrics.plot()
        from megatron_ext.train.checkpoint import file_barrier

        file_barrier()  # rank 0 may still be plotting
        return self.summary()

    def downstream_eval(self) -> None:
        """eval.tasks on the step just saved: rank 0 scores it (megatron_ext/eval), the other ranks wait."""
        from megatron_ext.checkpoint import step_dir_name
        from megatron_ext.eval.periodic import evaluate_step
        from megatron_ext.train.checkpoint import file_barrier

        self.ckpt.wait()  # an async save must be complete before its directory is read
        if self.rank0:
            evaluate_step(self.cfg.eval, self.ckpt.root / step_dir_name(self.step), self.run_dir, self.step,
                          writer=self.metrics)
        file_barrier()  # gloo, long timeout: the eval may outlast the NCCL timeout

    def summary(self) -> dict:
        t = self.cfg.train
        stopped_at = t.stop_at is not None and self.step == t.stop_at < t.steps and not self.stop_reason
        return {"rank": self.info.rank, "step": self.step, "steps": t.steps, "losses": self.losses,
                "val_losses": self.val_losses, "resumed_from": self.resumed_from,
                "preempted": self.stop_reason == PREEMPT, "interrupted": self.stop_reason == INTERRUPT,
                "signal": self.signals.signal_name if self.stop_reason else None,
                "stopped_at": stopped_at, "grad_accum": self.accum, "dp_size": self.engine.dp_size}
