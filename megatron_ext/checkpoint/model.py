"""A checkpoint's model as a plain one-process module: the one loader behind `checkpoints.load_hibari`, vocabulary
expansion and the evaluation run inside training (so both score exactly the same weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from hibari.errors import HibariError
from megatron_ext.checkpoint.format import read_model_json
from megatron_ext.checkpoint.tensors import iter_model_tensors
from megatron_ext.models import build_model
from megatron_ext.models.llama import ModelArgs, Transformer, rope_inv_freq


def load_model_state(ckpt_dir: str | Path, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict with hibari names, hibari_model.json contents); optimizer and recipe state are not read."""
    _, meta = read_model_json(ckpt_dir)
    state = {}
    for name, t in iter_model_tensors(ckpt_dir):
        state[name] = t.to(dtype) if dtype is not None else t
    return state, meta


def model_from_state(args: ModelArgs, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Transformer:
    """The plain model of `args` holding `state` (built on the meta device so no random init is wasted)."""
    with torch.device("meta"):
        model = build_model(args)  # Transformer, or MixtralTransformer for arch mixtral
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False,
                                                assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
        missing = [m for m in missing if m != "output.weight"]
    if missing or unexpected:
        raise HibariError(f"checkpoint does not match its architecture: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    model.rope_inv_freq = rope_inv_freq(args)  # a non-persistent buffer (fp32 whatever `dtype`): not in the state
    return model


def load_model(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model of a checkpoint (model-only or a training step) on CPU in eval mode: `model(input_ids)` -> logits
    [batch, seq, vocab]."""
    args, _ = read_model_json(ckpt_dir)
    state, _ = load_model_state(ckpt_dir)
    return model_from_state(args, state, dtype).eval()
