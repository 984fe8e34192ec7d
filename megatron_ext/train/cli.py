"""`hibari train CONFIG [a.b=v ...]`: one rank of a training job (started by `hibari launch local|slurm`, torchrun,
srun, or directly for a one-process run)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or continue training a Llama/Mistral model (one rank; see `hibari launch`)",
        description="Run one rank of a training job. Without a launcher it runs as a single process. Resumes "
                    "automatically from <run.dir>/checkpoints/latest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  hibari train configs/tiny.yaml run.dir=runs/tiny train.steps=50")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="a.b=v", help="config overrides, e.g. train.steps=100")
    p.add_argument("--check", action="store_true",
                   help="validate the config and the parallel layout for the world size, then exit")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from hibari.config import load_config
    from megatron_ext.train.config import TrainConfig
    from megatron_ext.train.loop import plan, train, world_size_from_env

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.check:
        world = world_size_from_env()
        model_args, layout, accum = plan(cfg, world)
        print(f"config ok: world {world}, dp {layout.dp_replicate * layout.dp_shard} x tp {layout.tp} x pp "
              f"{layout.pp}, grad accumulation {accum}, model {model_args.num_params() / 1e6:.1f}M params")
        return 0
    summary = train(cfg)
    if summary["rank"] != 0:
        return 0
    if summary["preempted"]:
        print(f"hibari: stopped at step {summary['step']} on a preemption signal (checkpoint saved); rerun the same "
              f"command to resume")
    elif summary["losses"]:
        last = max(summary["losses"])
        print(f"hibari: trained to step {summary['step']} (loss {summary['losses'][last]:.4f}); run dir "
              f"{cfg.run.dir}")
    else:
        print(f"hibari: nothing to do: {cfg.run.dir} is already at step {summary['step']} (train.steps)")
    return 0
