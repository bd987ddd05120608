"""PyTorch facade: ``from moe_router.torch import MoE, replace_moe_blocks, set_strategy``.

Importing this module imports torch (``import moe_router`` alone never does). It never imports
transformers, but it makes ``experts_implementation="moe_router"`` available to transformers:
registered at once if transformers' MoE integration is already loaded, else right after it gets
imported (a one-shot import hook), so the name works whatever the import order.
:func:`register_hf_experts` registers explicitly (idempotent).
"""

from __future__ import annotations

from moe_router.errors import UnknownFieldError
from moe_router_backends.torch.backend import TorchBackend
from moe_router_backends.torch.expert_parallel import (
    ExpertParallelGroups,
    expert_parallel,
    expert_parallel_groups,
    expert_parameters,
    gather_experts,
    sync_gradients,
)
from moe_router_backends.torch.hf import (
    from_hf_block,
    replace_moe_blocks,
    set_strategy,
)
from moe_router_backends.torch.hf_experts import (
    moe_router_experts_forward,
    register_hf_experts,
    register_hf_experts_lazily,
    use_moe_router_experts,
)
from moe_router_backends.torch.layers import MoE
from moe_router_backends.torch.model import calibrate, moe_layers, total_aux_loss

register_hf_experts_lazily()

__all__ = ["ExpertParallelGroups", "MoE", "TorchBackend", "UnknownFieldError", "calibrate",
           "expert_parallel", "expert_parallel_groups", "expert_parameters", "from_hf_block",
           "gather_experts",
           "moe_layers", "moe_router_experts_forward", "register_hf_experts",
           "replace_moe_blocks", "set_strategy", "sync_gradients", "total_aux_loss",
           "use_moe_router_experts"]
