"""The training loop: validate -> join the process group -> build the engine -> resume/init -> train.

One optimizer step = `grad_accum` micro-steps per data-parallel rank; global batch = micro x grad_accum x dp.
Everything a step depends on is a function of (weights, optimizer state, step, consumed samples, RNG state), all of
which the checkpoint holds, so a resumed run reproduces an uninterrupted one bit for bit (same layout, CPU fp32).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from pathlib import Path

import torch

from hibari.config import dump_config
from hibari.errors import ConfigError, HibariError
from megatron_ext.train.config import RUNTIME_MODEL_FIELDS, TrainConfig, check_batch_layout, resolve_model_args


class TrainingError(HibariError):
    """The run itself went wrong (non-finite loss, ...): one line, non-zero exit."""


def world_size_from_env(env=os.environ) -> int:
    """World size before any process group exists: torchrun's variable, else SLURM's, else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = env.get(name)
        if value:
            if not value.isdigit() or int(value) < 1:
                raise HibariError(f"environment variable {name}={value!r}: expected a positive integer")
            if name == "SLURM_NTASKS" and "SLURM_PROCID" not in env:
                continue
            return int(value)
    return 1


def plan(cfg: TrainConfig, world_size: int):
    """All checks that need no process group: (model args, resolved parallel layout, grad-accum steps).

    Raises a one-line HibariError naming the field. Touches no file except reading init.from's hibari_model.json.
    """
    from parallel import validate_layout

    model_args = resolve_model_args(cfg)
    if cfg.train.seq_length > model_args.max_seq_len:
        raise ConfigError(f"field train.seq_length: {cfg.train.seq_length} exceeds the model's max_seq_len "
                          f"({model_args.max_seq_len})")
    layout = validate_layout(cfg.parallel, model_args, world_size)
    dp = layout.dp_replicate * layout.dp_shard
    accum = check_batch_layout(cfg, dp)
    if layout.pp > 1 and cfg.train.micro_batch_size % layout.pp_microbatches:
        raise ConfigError(f"field train.micro_batch_size: {cfg.train.micro_batch_size} is not divisible by "
                          f"parallel.pp_microbatches ({layout.pp_microbatches}); the pipeline splits each micro "
                          f"batch into that many pieces")
    return model_args, layout, accum


class _Preemption:
    """SIGUSR1 (e.g. SLURM `--signal=USR1@120`) -> save a checkpoint at the end of the step and stop."""

    def __init__(self):
        self.requested = False
        self._old = None

    def install(self):
        try:
            self._old = signal.signal(signal.SIGUSR1, self._handler)
        except ValueError:  # not the main thread (e.g. called from a test worker thread)
            self._old = None

    def _handler(self, signum, frame):
        self.requested = True

    def uninstall(self):
        if self._old is not None:
            signal.signal(signal.SIGUSR1, self._old)

    def agreed(self) -> bool:
        """Every rank stops at the same step: the flag is max-reduced (signals reach ranks at different times)."""
        from megatron_ext.train.checkpoint import all_ranks_flag

        return all_ranks_flag(self.requested, "max")


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training job described by `cfg` in this process (one rank of a launched job).

    Returns a summary on every rank: {"step", "losses": {step: loss}, "val_losses", "resumed_from", ...}.
    """
    world = world_size_from_env()
    model_args, layout, accum = plan(cfg, world)  # before any process group or file

    from parallel.dist import destroy, init_distributed

    info = init_distributed()
    try:
        return _run(cfg, model_args, layout, accum, info)
    finally:
        destroy()


def _check_same_architecture(model_args, ckpt_dir: Path) -> None:
    from checkpoints.hibari_ckpt import read_model_json

    theirs, _ = read_model_json(ckpt_dir)
    a, b = model_args.model_dump(), theirs.model_dump()
    for key, value in a.items():
        if key not in RUNTIME_MODEL_FIELDS and b.get(key) != value:
            raise ConfigError(f"field model.{key}: {value!r} differs from the run's checkpoint {ckpt_dir} "
                              f"({b.get(key)!r}); use a new run.dir for a different model")


def _run(cfg: TrainConfig, model_args, layout, accum: int, info) -> dict:
    import json

    from checkpoints.hibari_ckpt import MODEL_JSON, read_model_json
    from hibari.progress import progress_bar
    from megatron_ext.train.checkpoint import Checkpointer, barrier, find_latest, read_train_state
    from megatron_ext.train.data import build_datasets, micro_batches
    from megatron_ext.train.lr import lr_at
    from megatron_ext.train.metrics import MetricsWriter, max_memory_mib, mfu
    from megatron_ext.train.optim import build_optimizer, set_lr
    from parallel import Engine, peak_flops

    rank0 = info.rank == 0
    t = cfg.train
    run_dir = Path(cfg.run.dir)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    barrier()
    # one pid file per rank: operators (and the failure test) can find and signal a given rank
    pid_dir = run_dir / "pids"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank_{info.rank:05d}.pid").write_text(f"{os.getpid()} {socket.gethostname()}\n")

    engine = Engine.build(model_args, layout, cfg.precision, info, seed=t.seed)
    optimizer = build_optimizer(engine.model_parts, cfg.optim, lr=lr_at(0, cfg.lr, t.steps), device=engine.device)
    ckpt = Checkpointer(run_dir, engine, optimizer, keep_last=cfg.checkpoint.keep_last,
                        async_save=cfg.checkpoint.async_save)
    ckpt.clean_stale()

    precision_schedule = None
    if cfg.precision.quantized and cfg.precision.switch_at is not None:
        from megatron_ext.precision import PrecisionSchedule

        precision_schedule = PrecisionSchedule(cfg.precision, planned_tokens=t.steps * t.global_batch_size *
                                               t.seq_length)

    step, consumed, hf_config, resumed_from = 0, 0, None, None
    latest = find_latest(ckpt.root)
    if latest is not None:
        # same run dir: resume everything, whatever init.from says (it only seeds a fresh run)
        _check_same_architecture(model_args, latest)
        ckpt.load(latest, with_optimizer=True, with_rng=True)
        state = read_train_state(latest)
        step, consumed = state["step"], state["consumed_samples"]
        hf_config = read_model_json(latest)[1].get("hf_config")
        if precision_schedule is not None and state.get("precision_schedule"):
            precision_schedule.load_state_dict(state["precision_schedule"])
        resumed_from = str(latest)
        if rank0:
            print(f"hibari: resuming from {latest} (step {step})", flush=True)
    elif cfg.init.from_ is not None:
        init_dir = Path(cfg.init.from_)
        ckpt.load(init_dir, with_optimizer=cfg.init.load_optimizer, with_rng=False)
        hf_config = read_model_json(init_dir)[1].get("hf_config")
        if rank0:
            what = "weights" + (" + optimizer" if cfg.init.load_optimizer else "")
            print(f"hibari: initialised {what} from {init_dir}", flush=True)
        if cfg.init.load_train_state:
            state = read_train_state(init_dir)
            step, consumed = state["step"], state["consumed_samples"]

    if rank0:
        # build index caches once (rank 0) before the other ranks read them
        train_ds, valid_ds = build_datasets(cfg, model_args.vocab_size)
    barrier()
    if not rank0:
        train_ds, valid_ds = build_datasets(cfg, model_args.vocab_size)

    metrics = MetricsWriter(run_dir, enabled=rank0, tensorboard=cfg.log.tensorboard)
    metrics.truncate_after(step)
    model_json = {"format": "hibari", "version": 1, "model": model_args.model_dump(mode="json"),
                  "hf_config": hf_config, "source": "hibari train"}
    config_yaml = (run_dir / "config.yaml").read_text(encoding="utf-8") if rank0 else ""

    tokens_per_step = t.global_batch_size * t.seq_length
    flops_per_token = model_args.flops_per_token(t.seq_length)
    peak = peak_flops(engine.device)
    precision_mode = cfg.precision.recipe
    device = engine.device
    preempt = _Preemption()
    preempt.install()
    losses, val_losses = {}, {}

    def evaluate() -> float:
        engine.set_train(False)
        total = torch.zeros((), dtype=torch.float32)
        n = 0
        with torch.no_grad():
            for b in range(t.eval_batches):
                for tokens, labels, docs in micro_batches(valid_ds, b * t.global_batch_size, t.global_batch_size,
                                                          t.micro_batch_size, engine.dp_rank, engine.dp_size, device):
                    loss = engine.forward_loss(tokens, labels, docs if t.document_mask else None)
                    total += loss.detach().float().cpu()
                    n += 1
        engine.set_train(True)
        return engine.dp_mean((total / n).to(device)).item()

    def save(at_step: int):
        train_state = {"step": at_step, "consumed_samples": consumed, "tokens": consumed * t.seq_length,
                       "world_size": info.world_size, "layout": layout.model_dump(mode="json"),
                       "precision_schedule": precision_schedule.state_dict() if precision_schedule else None}
        files = {MODEL_JSON: json.dumps({**model_json, "step": at_step}, indent=2, ensure_ascii=False),
                 "config.yaml": config_yaml}
        ckpt.save(at_step, train_state, files)
        if rank0 and cfg.log.plot:
            metrics.plot()

    engine.set_train(True)
    try:
        with progress_bar(total=t.steps - step, desc="train", unit="step",
                          enabled=rank0 and cfg.log.progress) as bar:
            while step < t.steps:
                t0 = time.perf_counter()
                if precision_schedule is not None:
                    for part in engine.model_parts:
                        msg = precision_schedule.step(consumed * t.seq_length, part)
                    if msg and rank0:
                        print(f"hibari: {msg}", flush=True)
                    precision_mode = precision_schedule.current_mode
                lr = lr_at(step, cfg.lr, t.steps)
                set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                micro_losses = []
                for micro, (tokens, labels, docs) in enumerate(micro_batches(
                        train_ds, consumed, t.global_batch_size, t.micro_batch_size, engine.dp_rank,
                        engine.dp_size, device)):
                    loss = engine.forward_backward(tokens, labels, docs if t.document_mask else None,
                                                   loss_scale=1.0 / accum, sync_grads=micro == accum - 1)
                    micro_losses.append(loss.detach().float())
                grad_norm = float(engine.clip_grad_norm_(t.grad_clip))
                optimizer.step()
                step += 1
                consumed += t.global_batch_size
                loss = engine.dp_mean(torch.stack(micro_losses).mean()).item()
                step_time = time.perf_counter() - t0
                if not math.isfinite(loss):
                    raise TrainingError(f"step {step}: loss is {loss} (lr {lr:.3g}, grad norm {grad_norm:.3g}); "
                                        f"lower lr.lr or check the data")
                losses[step] = loss
                val_loss = None
                if valid_ds is not None and t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
                    val_loss = evaluate()
                    val_losses[step] = val_loss
                tps = tokens_per_step / step_time
                metrics.log({
                    "step": step, "loss": loss, "val_loss": val_loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": tokens_per_step, "consumed_samples": consumed, "step_time_s": step_time,
                    "tokens_per_s": tps, "tokens_per_s_per_device": tps / info.world_size,
                    "mfu": mfu(tps / info.world_size, flops_per_token, peak),
                    "max_memory_mib": max_memory_mib(device), "precision": precision_mode,
                    "time": time.time()})
                bar.set_postfix(f"loss {loss:.4f} lr {lr:.2e}" + (f" val {val_loss:.4f}" if val_loss else ""))
                bar.advance(1)
                stop = preempt.agreed()
                interval = cfg.checkpoint.interval
                if (interval and step % interval == 0) or (step == t.steps and cfg.checkpoint.save_final) or stop:
                    save(step)
                else:
                    ckpt.poll()
                if stop:
                    if rank0:
                        print(f"hibari: preemption signal: saved step {step}, stopping", flush=True)
                    break
        ckpt.wait()
    finally:
        preempt.uninstall()
        metrics.close()
    if rank0 and cfg.log.plot:
        metrics.plot()
    barrier()
    return {"rank": info.rank, "step": step, "losses": losses, "val_losses": val_losses, "resumed_from": resumed_from,
            "preempted": preempt.requested, "grad_accum": accum, "dp_size": engine.dp_size}
