"""Dense peak FLOP/s per device and GEMM dtype, for MFU.

Keyed by the exact `torch.cuda.get_device_name()` string (substring matching confuses H100 PCIe / NVL / SXM, whose
peaks differ by 30 %). Values are the vendor's dense (no 2:4 sparsity) tensor-core peaks per GPU; None where the
device has no tensor-core path for that dtype (FP8 before Hopper/Ada, FP4 before Blackwell: a recipe emulating
them runs on the bf16 path). An unknown device gives None: MFU is then not reported rather than wrong.
"""

from __future__ import annotations

import torch

T = 1e12
# name -> {gemm dtype: dense peak FLOP/s}
_H100_SXM = {"bf16": 989.4 * T, "fp8": 1978.9 * T, "fp4": None}
_H100_PCIE = {"bf16": 756.5 * T, "fp8": 1513.0 * T, "fp4": None}
_H100_NVL = {"bf16": 835.5 * T, "fp8": 1670.5 * T, "fp4": None}
_A100 = {"bf16": 312 * T, "fp8": None, "fp4": None}
PEAK_FLOPS: dict[str, dict[str, float | None]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 SXM5 80GB": _H100_SXM,
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H800": _H100_SXM,
    "NVIDIA H200": _H100_SXM,  # same SMs and clocks as H100 SXM, more and faster HBM
    "NVIDIA H200 NVL": _H100_NVL,
    "NVIDIA GH200 480GB": _H100_SXM,
    "NVIDIA B200": {"bf16": 2250 * T, "fp8": 4500 * T, "fp4": 9000 * T},
    "NVIDIA GB200": {"bf16": 2500 * T, "fp8": 5000 * T, "fp4": 10000 * T},
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA L40S": {"bf16": 362.1 * T, "fp8": 733 * T, "fp4": None},
}

# precision recipe -> the dtype its linear-layer GEMMs run in
# (fp32 is conventionally reported against the bf16 peak, as TorchTitan and Megatron do)
RECIPE_GEMM_DTYPE = {"fp32": "bf16", "bf16": "bf16", "fp8_tensorwise": "fp8", "fp8_rowwise": "fp8",
                     "fp8_delayed": "fp8", "mxfp8": "fp8", "nvfp4": "fp4"}


def peak_flops_for(name: str, gemm_dtype: str = "bf16") -> float | None:
    """Dense peak of the device called `name` for GEMMs in `gemm_dtype` ("bf16", "fp8", "fp4"), or None."""
    return PEAK_FLOPS.get(name.strip(), {}).get(gemm_dtype)


def peak_flops(device: torch.device | str, gemm_dtype: str = "bf16") -> float | None:
    """Dense peak of `device` for GEMMs in `gemm_dtype`; None on CPU or for a device not in the table."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for(torch.cuda.get_device_name(device), gemm_dtype)
