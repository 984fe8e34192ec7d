"""Low-precision training recipes: NVFP4 (with random Hadamard transforms and stochastic rounding) and FP8
(tensorwise / rowwise / delayed scaling, MXFP8): operands quantized bit-exactly, GEMMs in bf16 on exact values
(NVFP4) or `torch._scaled_mm` / its emulation (FP8), no host syncs; TransformerEngine as an optional backend.

    from megatron_ext.precision import PrecisionConfig, apply_precision, PrecisionSchedule
    apply_precision(model, cfg)                      # swap block linears for quantized ones (in place)
    schedule = PrecisionSchedule(cfg, planned_tokens)
    msg = schedule.step(tokens_seen, model)          # mid-run switch to BF16 / BF16-forward, no restart
    set_step_context(model, step=step, micro_batch=micro, dp_rank=dp_rank, dp_group=dp_group)  # each micro-step

`megatron_ext.precision.nvfp4.quantize(x, tile=(1, 16), rounding="rne", generator=None)` is the NVFP4 quantizer.
"""

from megatron_ext.precision.apply import PrecisionSchedule, apply_precision, quantized_block_names, set_precision_mode
from megatron_ext.precision.config import QUANTIZED_RECIPES, PrecisionConfig
from megatron_ext.precision.linear import QuantizedLinear, quantized_linear
from megatron_ext.precision.rounding import set_step_context

__all__ = ["PrecisionConfig", "PrecisionSchedule", "QUANTIZED_RECIPES", "QuantizedLinear", "apply_precision",
           "quantized_block_names", "quantized_linear", "set_precision_mode", "set_step_context"]
