"""`precision.backend: te`: TransformerEngine's te.Linear for the selected linears (GPU only; imported lazily, never
needed by the tests, which cover the recipe mapping and the selection without TE installed).

The same selective-precision rules pick the layers (`apply_precision`: first/last blocks in BF16, the same size
checks); each selected nn.Linear becomes a te.pytorch.Linear sharing the same weight Parameter (same checkpoint
names), whose forward runs under TE's autocast with the recipe below:

    fp8_tensorwise -> Float8CurrentScaling(HYBRID)      fp8_delayed -> DelayedScaling(HYBRID, amax_history_len, max)
    mxfp8          -> MXFP8BlockScaling()               nvfp4       -> NVFP4BlockScaling(rht / SR / 2D switches)

What differs from hibari's own recipes: TE's kernels (Hopper: FP8 tensor cores; Blackwell: FP8/MXFP8/NVFP4) replace
the emulation; the NVFP4 RHT uses TE's fixed sign vector (hibari: a seeded per-layer one) and TE's own SR random
numbers (not hibari's position-keyed counter, so SR resume is not bitwise and TP ranks draw their own noise); TE
keeps its scaling state (delayed-scaling amax history) in the module's `_extra_state`, an extra checkpoint key per
layer; the mid-run switch supports `switch_mode: bf16` only (TE cannot run fprop in BF16 with quantized
dgrad/wgrad); fp8_rowwise has no TE recipe; TE's own tensor parallelism is not wired to hibari's DTensor plan, so use
tp = 1 (FSDP2 / pipeline are fine).
"""

from __future__ import annotations

import torch.nn as nn

from hibari.errors import HibariError

TE_RECIPES = ("fp8_tensorwise", "fp8_delayed", "mxfp8", "nvfp4")


def _import_te():
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415
        from transformer_engine.common import recipe as te_recipe  # noqa: PLC0415
    except ImportError as err:
        raise HibariError(f"precision.backend=te needs TransformerEngine ({err}); install transformer-engine[pytorch] "
                          "on a GPU machine or use backend=auto") from None
    return te, te_recipe


def te_recipe_for(cfg, te_recipe):
    """The TransformerEngine recipe object for hibari's `cfg` (module `transformer_engine.common.recipe`)."""
    fmt = te_recipe.Format
    if cfg.recipe == "fp8_tensorwise":
        return te_recipe.Float8CurrentScaling(fp8_format=fmt.HYBRID)
    if cfg.recipe == "fp8_delayed":
        return te_recipe.DelayedScaling(fp8_format=fmt.HYBRID, amax_history_len=cfg.amax_history_len,
                                        amax_compute_algo="max")
    if cfg.recipe == "mxfp8":
        return te_recipe.MXFP8BlockScaling()
    if cfg.recipe == "nvfp4":
        rec = te_recipe.NVFP4BlockScaling()
        for field, value in (("disable_rht", not cfg.rht), ("disable_stochastic_rounding", not cfg.stochastic_rounding),
                             ("disable_2d_quantization", not cfg.weight_2d)):
            if value and not hasattr(rec, field):
                raise HibariError(f"precision.backend=te: this TransformerEngine's NVFP4BlockScaling has no {field}; "
                                  "upgrade TransformerEngine or keep the default switch")
            if hasattr(rec, field):
                setattr(rec, field, value)
        return rec
    raise HibariError(f"precision.backend=te supports recipes {', '.join(TE_RECIPES)}, not {cfg.recipe}")


def apply_te(model: nn.Module, cfg, targets: list[tuple[str, nn.Linear]], set_child) -> None:
    """Swap each (qualified name, nn.Linear) in `targets` for a te.Linear running `cfg`'s recipe."""
    te, te_recipe = _import_te()
    recipe = te_recipe_for(cfg, te_recipe)
    autocast = getattr(te, "autocast", None)

    class HibariTELinear(te.Linear):
        """te.Linear under TE's autocast with hibari's recipe; `mode` "bf16" runs it unquantized (the switch)."""

        mode = "quantized"

        def forward(self, x, *args, **kwargs):
            enabled = self.mode != "bf16"
            ctx = (autocast(enabled=enabled, recipe=recipe) if autocast is not None
                   else te.fp8_autocast(enabled=enabled, fp8_recipe=recipe))
            with ctx:
                return super().forward(x, *args, **kwargs)

    for name, lin in targets:
        new = HibariTELinear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                             params_dtype=lin.weight.dtype, device=lin.weight.device)
        new.weight = lin.weight
        if lin.bias is not None:
            new.bias = lin.bias
        set_child(model, name, new)


def is_te_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "HibariTELinear"
