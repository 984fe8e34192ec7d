"""hibari's 3D-parallel engine on PyTorch-native distributed (DeviceMesh, DTensor TP/SP, pipelining, FSDP2)."""

from parallel.config import ParallelConfig
from parallel.dist import DistInfo, destroy, init_distributed
from parallel.engine import Engine
from parallel.flops import peak_flops
from parallel.layout import validate_layout
from parallel.plan import ModelPlan

__all__ = ["DistInfo", "Engine", "ModelPlan", "ParallelConfig", "destroy", "init_distributed", "peak_flops",
           "validate_layout"]
