"""HF <-> hibari checkpoint conversion, DCP sharded checkpoints, export to HF safetensors.

Python API: `checkpoints.load_hibari(DIR, dtype=torch.float32)` returns the model of a hibari checkpoint on CPU.
Imports are lazy so `import checkpoints` stays cheap.
"""


def load_hibari(ckpt_dir, dtype=None):
    import torch

    from megatron_ext.checkpoint import load_model

    return load_model(ckpt_dir, dtype=dtype or torch.float32)


def __getattr__(name):
    if name in ("hf_to_hibari", "hibari_to_hf"):
        from checkpoints import convert

        return getattr(convert, name)
    raise AttributeError(name)
