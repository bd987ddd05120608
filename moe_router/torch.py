"""PyTorch facade: ``from moe_router.torch import MoE, replace_moe_blocks, set_strategy``.

Importing this module imports torch (``import moe_router`` alone never does).
"""

from __future__ import annotations

from moe_router.errors import UnknownFieldError
from moe_router_backends.torch.backend import TorchBackend
from moe_router_backends.torch.hf import (
    from_hf_block,
    replace_moe_blocks,
    set_strategy,
)
from moe_router_backends.torch.layers import MoE
from moe_router_backends.torch.model import calibrate, moe_layers, total_aux_loss

__all__ = ["MoE", "TorchBackend", "UnknownFieldError", "calibrate", "from_hf_block",
           "moe_layers", "replace_moe_blocks", "set_strategy", "total_aux_loss"]
