"""AdamW with a weight-decay mask.

Decay applies to the matrices of the transformer blocks and to the output head. It does not apply to
- norm weights (every 1-D parameter): decaying a gain towards 0 changes what the layer computes, not its capacity;
- the input embedding table (unless `optim.decay_embeddings`): rows of rare tokens are updated rarely, and decay
  would shrink them between updates (a tied head follows the embedding: it is the same tensor).
This is the GPT-NeoX / OLMo convention; Megatron-LM differs only in decaying the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_ext.train.config import OptimConfig
from parallel.parallelize import strip_wrapper_prefixes


def applies_weight_decay(name: str, param: torch.Tensor, cfg: OptimConfig) -> bool:
    if param.ndim < 2:
        return False
    if strip_wrapper_prefixes(name).endswith("tok_embeddings.weight") and not cfg.decay_embeddings:
        return False
    return True


def param_groups(model_parts: list[nn.Module], cfg: OptimConfig) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for part in model_parts:
        for name, p in part.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if applies_weight_decay(name, p, cfg) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model_parts: list[nn.Module], cfg: OptimConfig, lr: float, device: torch.device):
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model_parts, cfg), lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
