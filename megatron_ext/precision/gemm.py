"""The GEMMs of the quantized recipes, and which implementation runs them (`precision.backend`).

- NVFP4: FP4 codes x E4M3 block scales are exact in bf16, so the GEMM runs on the unscaled dequantized operands in
  bf16 with fp32 accumulation (`torch.mm(..., out_dtype=float32)` on CUDA: tensor cores; on CPU, which has no
  bf16->fp32 mm, the exact bf16 values are multiplied in fp32, the same products and accumulation) and the two
  per-tensor fp32 factors are applied to the output: tensor-core speed on any GPU without FP4 units.
- FP8 (tensorwise / rowwise): `torch._scaled_mm` on the E4M3/E5M2 codes with the inverse scales (CUDA sm89+: FP8
  tensor cores), or its emulation (codes upcast to fp32, fp32 GEMM, scales on the output): exact products, fp32
  accumulation, so the two differ only in summation order.

backend (PrecisionConfig.backend): auto = scaled_mm where the device has FP8 tensor cores (CUDA sm89+), emulated
elsewhere; emulated; scaled_mm (force it; torch 2.13 also runs it on CPU, which the tests use to check it against
the emulation); torchao (Float8Linear, fp8_tensorwise/rowwise); te (TransformerEngine, `te_backend.py`).
"""

from __future__ import annotations

import torch

_MM_DTYPE_OK: dict[str, bool] = {}


def fp8_tensor_cores(device: torch.device) -> bool:
    """True on CUDA devices of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def use_scaled_mm(backend: str, device: torch.device) -> bool:
    """Whether the FP8 recipes run `torch._scaled_mm` (True) or the emulation (False) under `backend`."""
    if backend == "scaled_mm":
        return True
    if backend == "auto":
        return fp8_tensor_cores(device)
    return False


def exact_bf16_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T in float32 for bf16 operands whose values are exact in bf16 (fp32 accumulation)."""
    if a.device.type == "cuda":
        dev = str(a.device)
        if _MM_DTYPE_OK.get(dev, True):
            try:
                return torch.mm(a, b.t(), out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_DTYPE_OK[dev] = False  # older builds: bf16 output, one rounding of the result
        return torch.mm(a, b.t()).to(torch.float32)
    return torch.mm(a.to(torch.float32), b.to(torch.float32).t())


def fp8_gemm(a: torch.Tensor, a_inv_scale: torch.Tensor, b: torch.Tensor, b_inv_scale: torch.Tensor,
             scaled_mm: bool) -> torch.Tensor:
    """(a [M, K] @ b [N, K]^T) * a_inv_scale * b_inv_scale^T in float32; a, b FP8 codes (the emulation also takes
    them already upcast); inverse scales one-element (tensorwise) or [M, 1] / [N, 1] (rowwise)."""
    if scaled_mm and not (a.shape[0] % 16 or a.shape[1] % 16 or b.shape[0] % 16):  # _scaled_mm's shape rule
        tensorwise = a_inv_scale.numel() == 1
        sa = a_inv_scale.reshape(()) if tensorwise else a_inv_scale
        sb = b_inv_scale.reshape(()) if tensorwise else b_inv_scale.reshape(1, -1)
        # CUDA's row-wise kernels write bf16 only (one rounding of the output; tensorwise and CPU write fp32)
        out_dtype = torch.bfloat16 if (a.is_cuda and not tensorwise) else torch.float32
        # _scaled_mm wants a row-major and b column-major: b.t() of a row-major [N, K] is
        out = torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
        return out.to(torch.float32)
    out = torch.mm(a.to(torch.float32), b.to(torch.float32).t())
    if a_inv_scale.numel() == 1:
        return out.mul_(a_inv_scale * b_inv_scale)
    return out.mul_(a_inv_scale).mul_(b_inv_scale.reshape(1, -1))
