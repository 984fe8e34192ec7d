"""`hibari train CONFIG [a.b=v ...]`: one rank of a training job (started by `hibari launch local|slurm`, torchrun,
srun, or directly for a one-process run)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or continue training a Llama/Mistral model (one rank; see `hibari launch`)",
        description="Run one rank of a training job. Without a launcher it runs as a single process. Resumes "
                    "automatically from the newest usable checkpoint in <run.dir>/checkpoints (a damaged newer one "
                    "is skipped with a warning). SIGUSR1/SIGTERM: checkpoint after the current step and exit 0; "
                    "Ctrl-C: the same, exit 130 (twice: stop at once).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  hibari train configs/tiny.yaml run.dir=runs/tiny train.steps=50\n"
               "  hibari train configs/tiny.yaml run.dir=runs/tiny train.stop_at=20   # first job: steps 1-20")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="a.b=v", help="config overrides, e.g. train.steps=100")
    p.add_argument("--check", action="store_true",
                   help="check everything knowable before starting (layout, layer sizes, data, init checkpoint) "
                        "for the world size, then exit; writes nothing")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from hibari.config import load_config
    from megatron_ext.train.config import TrainConfig
    from megatron_ext.train.loop import preflight, train, world_size_from_env

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.check:
        world = world_size_from_env()
        checked = preflight(cfg, world)
        layout = checked.layout
        for note in checked.notes:
            print(f"  {note}")
        print(f"config ok: world {world}, dp {layout.dp_replicate * layout.dp_shard} x tp {layout.tp} x pp "
              f"{layout.pp}, grad accumulation {checked.grad_accum}, model "
              f"{checked.model_args.num_params() / 1e6:.1f}M params")
        return 0
    summary = train(cfg)
    if summary["rank"] != 0:
        return 130 if summary["interrupted"] else 0
    step = summary["step"]
    if summary["interrupted"]:
        print(f"hibari: interrupted, saved step {step}")
        return 130
    if summary["preempted"]:
        print(f"hibari: stopped at step {step} on {summary['signal']} (checkpoint saved); rerun the same command "
              f"to resume")
    elif summary["stopped_at"]:
        print(f"hibari: stopped at step {step} (train.stop_at, checkpoint saved); rerun with a later "
              f"train.stop_at or without it to continue to step {summary['steps']}")
    elif summary["losses"]:
        last = max(summary["losses"])
        print(f"hibari: trained to step {step} (loss {summary['losses'][last]:.4f}); run dir {cfg.run.dir}")
    elif cfg.train.stop_at is not None and step >= cfg.train.stop_at and step < cfg.train.steps:
        print(f"hibari: nothing to do: {cfg.run.dir} is already at step {step} (train.stop_at); raise or remove "
              f"train.stop_at to continue")
    else:
        print(f"hibari: nothing to do: {cfg.run.dir} is already at step {step} (train.steps)")
    return 0
