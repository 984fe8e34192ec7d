"""Apply a precision recipe to a model, and switch it mid-run (precision schedule)."""

from __future__ import annotations

import math
import weakref
import zlib

import torch.nn as nn

from hibari.errors import HibariError
from megatron_ext.precision.config import PrecisionConfig
from megatron_ext.precision.grouped import (ExpertRecipes, check_experts_supported, expert_sizes, is_grouped_experts,
                                            moe_high_precision_linears)
from megatron_ext.precision.fusion import fuse_linear_groups
from megatron_ext.precision.linear import RECIPES, QuantizedLinear
from megatron_ext.precision.te_backend import apply_te, is_te_linear

TORCHAO_RECIPES = {"fp8_tensorwise": "tensorwise", "fp8_rowwise": "rowwise"}


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        return [(f"layers.{k}", v) for k, v in layers.items()]
    if isinstance(layers, (nn.ModuleList, nn.Sequential)):
        return [(f"layers.{i}", v) for i, v in enumerate(layers)]
    raise HibariError("precision: the model has no `layers` (ModuleDict/ModuleList of transformer blocks) "
                      f"to apply the recipe to ({type(model).__name__})")


def quantized_block_names(model: nn.Module, cfg: PrecisionConfig) -> list[str]:
    """Names of the blocks whose linears get the recipe (all but the first N and last M)."""
    blocks = _blocks(model)
    n = len(blocks)
    keep = cfg.bf16_first_layers + cfg.bf16_last_layers
    if keep >= n:
        raise HibariError(f"precision: bf16_first_layers + bf16_last_layers = {keep} leaves none of the {n} "
                          f"transformer blocks in {cfg.recipe}; lower them")
    return [name for name, _ in blocks[cfg.bf16_first_layers:n - cfg.bf16_last_layers]]


def _layer_seed(cfg: PrecisionConfig, qualified_name: str) -> int:
    return (cfg.seed * 1_000_003 + zlib.crc32(qualified_name.encode())) % (2 ** 62)


def _check_dims(name: str, lin: nn.Linear, cfg: PrecisionConfig) -> None:
    multiple = cfg.size_multiple
    if lin.in_features % multiple or lin.out_features % multiple:
        raise HibariError(f"precision.recipe={cfg.recipe}: linear {name} is {lin.in_features}->{lin.out_features}; "
                          f"both sizes must be multiples of {multiple}")


def _set_child(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, leaf = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def apply_precision(model: nn.Module, cfg: PrecisionConfig, linear_groups: tuple = ()) -> nn.Module:
    """In place: swap the nn.Linear modules inside the selected transformer blocks for quantized linears (same
    Parameter objects and names, so checkpoints hold master weights only), and give their grouped experts (MoE) one
    recipe per expert GEMM (`grouped.py`; the MoE router stays high precision). fp32/bf16: the model is unchanged."""
    if not cfg.quantized:
        return model
    targets, experts = [], []
    block_names = quantized_block_names(model, cfg)
    for block_name in block_names:
        block = model.get_submodule(block_name)
        routers = moe_high_precision_linears(block)
        for sub_name, mod in block.named_modules():
            if is_grouped_experts(mod):
                experts.append((f"{block_name}.{sub_name}", mod))
            if sub_name in routers:
                continue
            if isinstance(mod, nn.Linear) and not isinstance(mod, QuantizedLinear) and sub_name:
                qualified = f"{block_name}.{sub_name}"
                _check_dims(qualified, mod, cfg)
                targets.append((qualified, mod))
    _apply_experts(experts, cfg)
    if cfg.backend == "torchao":
        _apply_torchao(model, cfg, {name for name, _ in targets})
        return model
    if cfg.backend == "te":
        apply_te(model, cfg, targets, _set_child)
        return model
    for qualified, mod in targets:
        recipe = RECIPES[cfg.recipe](cfg, _layer_seed(cfg, qualified))
        _set_child(model, qualified, QuantizedLinear.from_linear(mod, recipe))
    fuse_linear_groups(model, block_names, linear_groups)  # same-input linears: fusion.py
    return model


def _apply_experts(experts: list[tuple[str, nn.Module]], cfg: PrecisionConfig) -> None:
    """Each grouped-experts module gets one recipe per (weight, global expert), seeded by `<name>.<w>.<e>`."""
    for qualified, mod in experts:
        check_experts_supported(cfg, qualified)
        multiple = cfg.size_multiple
        for w, fan_in, fan_out in expert_sizes(mod):
            if fan_in % multiple or fan_out % multiple:
                raise HibariError(f"precision.recipe={cfg.recipe}: experts {qualified}.{w} are {fan_in}->{fan_out}; "
                                  f"both sizes must be multiples of {multiple}")
        n = getattr(mod, mod.grouped_weights[0]).shape[0]
        mod.recipe = ExpertRecipes(cfg, {w: [_layer_seed(cfg, f"{qualified}.{w}.{e}") for e in range(n)]
                                         for w in mod.grouped_weights})
        mod.mode = "quantized"


def _apply_torchao(model: nn.Module, cfg: PrecisionConfig, names: set[str]) -> None:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise HibariError(f"precision.backend=torchao needs torchao ({err}); "
                          "install it with `pip install torchao --no-deps` or use backend=auto") from None
    import dataclasses

    import torch

    ao_cfg = Float8LinearConfig.from_recipe_name(TORCHAO_RECIPES[cfg.recipe])
    emulate = not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)
    ao_cfg = dataclasses.replace(ao_cfg, emulate=emulate)
    convert_to_float8_training(model, config=ao_cfg, module_filter_fn=lambda mod, fqn: fqn in names)


def set_precision_mode(model: nn.Module, mode: str) -> int:
    """Set every QuantizedLinear and quantized grouped experts module (MoE: one per block) to `mode` ("quantized" |
    "forward_only" | "bf16"). torchao Float8Linear modules can only go to "bf16": they are swapped back to nn.Linear
    sharing the same Parameters; TransformerEngine linears (backend te) run unquantized in "bf16". Returns #layers
    changed."""
    changed = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantizedLinear):
            mod.mode = mode
            changed += 1
        elif is_grouped_experts(mod) and getattr(mod, "recipe", None) is not None:
            mod.mode = mode
            changed += 1
        elif is_te_linear(mod):
            if mode == "forward_only":
                raise HibariError("precision.switch_mode=forward_only is not available with backend=te; "
                                  "use switch_mode=bf16")
            mod.mode = mode
            changed += 1
        elif type(mod).__name__ == "Float8Linear" and isinstance(mod, nn.Linear):
            if mode != "bf16":
                raise HibariError(f"precision.switch_mode={mode} is not available with backend=torchao; "
                                  "use switch_mode=bf16 or backend=auto")
            plain = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(plain)
            plain.in_features, plain.out_features = mod.in_features, mod.out_features
            plain.weight, plain.bias = mod.weight, mod.bias
            plain.train(mod.training)
            _set_child(model, name, plain)
            changed += 1
    return changed


class PrecisionSchedule:
    """Switches precision once, at `switch_at` x planned tokens, without a restart.

    Call `step(tokens_seen, model)` every optimizer step, once per model part (pipeline stages held by this rank);
    it switches every part it is given once the threshold is crossed and returns a one-line description for the
    parts switched on that step (log it in the metrics), else None. `current_mode` names the active precision for
    metrics. `state_dict()` / `load_state_dict()` make the switch survive checkpoint/resume: after a resume the
    next `step()` re-applies the switched mode to the freshly built model parts.
    """

    def __init__(self, cfg: PrecisionConfig, planned_tokens: int):
        self.cfg = cfg
        self.planned_tokens = int(planned_tokens)
        self.switch_tokens = (math.ceil(cfg.switch_at * self.planned_tokens)
                              if cfg.switch_at is not None and cfg.quantized else None)
        self.switched_at_tokens: int | None = None
        self._in_sync = weakref.WeakSet()  # model parts already set to the switched mode
        self._restored = False

    @property
    def switched(self) -> bool:
        return self.switched_at_tokens is not None

    @property
    def target_mode(self) -> str:
        return "bf16" if self.cfg.switch_mode == "bf16" else "forward_only"

    @property
    def current_mode(self) -> str:
        if not self.switched:
            return self.cfg.recipe
        return "bf16" if self.target_mode == "bf16" else f"bf16_fwd+{self.cfg.recipe}_bwd"

    def step(self, tokens_seen: int, model: nn.Module) -> str | None:
        if not self.switched:
            if self.switch_tokens is None or tokens_seen < self.switch_tokens:
                return None
            self.switched_at_tokens = int(tokens_seen)
        if model in self._in_sync:
            return None
        n = set_precision_mode(model, self.target_mode)
        self._in_sync.add(model)
        if self._restored or tokens_seen != self.switched_at_tokens:
            return None  # re-applied after a resume: the switch itself was logged by the original run
        frac = tokens_seen / max(self.planned_tokens, 1)
        return (f"precision switch at {tokens_seen} tokens ({frac:.1%} of planned): {self.cfg.recipe} -> "
                f"{self.current_mode} on {n} linear layers")

    def state_dict(self) -> dict:
        return {"recipe": self.cfg.recipe, "switch_tokens": self.switch_tokens,
                "switched_at_tokens": self.switched_at_tokens}

    def load_state_dict(self, state: dict) -> None:
        if state.get("recipe") != self.cfg.recipe:
            raise HibariError(f"precision: checkpoint was trained with recipe {state.get('recipe')!r}, "
                              f"config says {self.cfg.recipe!r}")
        self.switched_at_tokens = state.get("switched_at_tokens")
        self._in_sync = weakref.WeakSet()
        self._restored = self.switched
