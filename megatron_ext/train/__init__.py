"""Training around the parallel engine: config, pre-flight checks, the Trainer (setup/resume, train_step, evaluate,
save), LR schedules, AdamW, checkpoints (format: megatron_ext.checkpoint), stop signals, metrics.

    from hibari.config import load_config
    from megatron_ext.train import TrainConfig, train
    summary = train(load_config(TrainConfig, "configs/tiny.yaml", ["run.dir=runs/x"]))

Names are resolved lazily: importing the package (as `hibari --help` does) does not import torch.
"""

__all__ = ["TrainConfig", "train"]


def __getattr__(name):
    if name == "train":
        from megatron_ext.train.loop import train

        return train
    if name == "TrainConfig":
        from megatron_ext.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(name)
