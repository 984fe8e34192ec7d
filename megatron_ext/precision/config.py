"""`precision:` section of the training config."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, ValidationInfo, field_validator

from hibari.config import StrictModel

Recipe = Literal["fp32", "bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8", "nvfp4"]
QUANTIZED_RECIPES = ("fp8_tensorwise", "fp8_rowwise", "fp8_delayed", "mxfp8", "nvfp4")


class PrecisionConfig(StrictModel):
    """Low-precision recipe for the linear layers of the transformer blocks.

    fp32 / bf16 leave the model alone (the training loop picks the dtype / autocast). The quantized recipes swap the
    block linears (attention wq/wk/wv/wo, MLP w1/w2/w3) for emulated quantized GEMMs; embeddings, output head, norms
    and attention BMMs stay in high precision, as do the first `bf16_first_layers` and last `bf16_last_layers`
    blocks.
    """

    recipe: Recipe = "bf16"
    bf16_first_layers: int = Field(1, ge=0, description="first N transformer blocks kept in BF16")
    bf16_last_layers: int = Field(1, ge=0, description="last M transformer blocks kept in BF16")
    # NVFP4 switches (mirroring TransformerEngine's disable flags)
    rht: bool = Field(True, description="nvfp4: random Hadamard transform on the wgrad GEMM operands")
    stochastic_rounding: bool = Field(True, description="nvfp4: stochastic rounding of gradients (dy)")
    weight_2d: bool = Field(True, description="nvfp4: 16x16 weight tiles so fprop and dgrad see the same weights")
    # precision schedule
    switch_at: Optional[float] = Field(None, gt=0.0, le=1.0,
                                       description="fraction of planned tokens after which the precision switches")
    switch_mode: Literal["bf16", "forward_only"] = Field(
        "forward_only", description="bf16: all GEMMs high precision; forward_only: fprop in BF16, backward quantized")
    seed: int = Field(0, description="seeds the per-layer Hadamard signs and stochastic-rounding generators")
    # FP8 knobs
    amax_history_len: int = Field(1024, ge=1, description="fp8_delayed: amax history length (max over it)")
    hadamard: bool = Field(False, description="fp8_*/mxfp8: random Hadamard transform on the wgrad GEMM operands")
    backend: Literal["auto", "emulated", "scaled_mm", "torchao", "te"] = Field(
        "auto", description="GEMM implementation: auto (torch._scaled_mm FP8 GEMMs on CUDA sm89+, emulation "
                            "elsewhere), emulated, scaled_mm (force), torchao (Float8Linear, fp8_tensorwise/"
                            "rowwise), te (TransformerEngine te.Linear)")

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, backend: str, info: ValidationInfo) -> str:
        supported = {"torchao": ("fp8_tensorwise", "fp8_rowwise"),
                     "te": ("fp8_tensorwise", "fp8_delayed", "mxfp8", "nvfp4")}.get(backend)
        recipe = info.data.get("recipe")
        if supported and recipe in QUANTIZED_RECIPES and recipe not in supported:
            raise ValueError(f"backend {backend} runs recipes {', '.join(supported)}, not {recipe}")
        if supported and info.data.get("switch_at") is not None and info.data.get("switch_mode") == "forward_only":
            raise ValueError(f"backend {backend} supports switch_mode bf16 only (not forward_only)")
        return backend

    @property
    def quantized(self) -> bool:
        return self.recipe in QUANTIZED_RECIPES

    @property
    def size_multiple(self) -> int:
        """Both sizes of every quantized GEMM weight must be multiples of this: the recipe's block (mxfp8: 32)."""
        return 32 if self.recipe == "mxfp8" else 16
