"""Random Hadamard transform (RHT) on 16-element blocks.

T = diag(sign) @ H16 / 4 with H16 the Sylvester Hadamard matrix (entries +-1), so T T^T = I. Applied blockwise along
the GEMM reduction dimension to BOTH operands (A_blocks @ T and B_blocks @ T), the product A B^T is unchanged in exact
arithmetic while outliers are spread over the 16 elements of each block before NVFP4 quantization.
"""

from __future__ import annotations

import torch

BLOCK = 16
# TransformerEngine's fixed sign vector (a seeded per-layer vector is equally valid).
TE_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def sylvester_hadamard(n: int = BLOCK) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, device="cpu")  # explicit: recipes are built under torch.device("meta") too
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def random_signs(seed: int, n: int = BLOCK) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g, device="cpu").to(torch.float32) * 2 - 1


def rht_matrix(signs: torch.Tensor | None = None) -> torch.Tensor:
    """T = diag(signs) @ H16 / 4 (float32, orthogonal). signs=None: TE's fixed vector."""
    s = torch.tensor(TE_SIGNS, dtype=torch.float32, device="cpu") if signs is None else signs.to(torch.float32)
    return s.unsqueeze(1) * sylvester_hadamard(s.numel()) / 4.0


def apply_rht(x: torch.Tensor, t: torch.Tensor, round_to_bf16: bool = True) -> torch.Tensor:
    """Blockwise x[..., 16k:16k+16] @ T along the last dim (length a multiple of 16). The output is rounded to bf16
    (as in TE: the transform runs in bf16 before the amax is taken) and returned in float32 (float64 for float64
    input)."""
    n = x.shape[-1]
    if n % BLOCK:
        raise ValueError(f"RHT: last dimension {n} is not a multiple of {BLOCK}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = (x.to(dtype).reshape(-1, BLOCK) @ t.to(x.device, dtype)).reshape(x.shape)  # one 2-D GEMM, not a bmm
    return y.to(torch.bfloat16).to(dtype) if round_to_bf16 else y
