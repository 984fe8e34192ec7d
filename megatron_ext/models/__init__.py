"""Plain-PyTorch decoder models (Llama 2/3, Mistral). No parallelism inside."""

from megatron_ext.models.llama import ModelArgs, RopeScaling, Transformer, build_attention_mask

__all__ = ["ModelArgs", "RopeScaling", "Transformer", "build_attention_mask"]
