"""Plain-PyTorch decoder models (Llama 2/3, Mistral, Mixtral). No parallelism inside."""

from megatron_ext.models.attention import build_attention_mask
from megatron_ext.models.llama import ModelArgs, RopeScaling, Transformer
from megatron_ext.models.mixtral import MixtralTransformer


def build_model(args: ModelArgs) -> Transformer:
    """The plain model of an architecture: `MixtralTransformer` for arch mixtral, `Transformer` otherwise."""
    return MixtralTransformer(args) if args.arch == "mixtral" else Transformer(args)


__all__ = ["MixtralTransformer", "ModelArgs", "RopeScaling", "Transformer", "build_attention_mask", "build_model"]
