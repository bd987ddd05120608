"""Expert offloading: run MoE models whose experts do not fit in fast memory.

The core here is framework-free (imports no torch / jax / tensorflow): routing traces
(:class:`RoutingTrace`), eviction policies, the expert cache and its per-layer metrics, the
offline simulator (:func:`simulate`), synthetic Zipf + Markov traces, lazy safetensors reads, and
thin wrappers over the debugger's Prometheus / TensorBoard export of the metrics (a
``MoEDebugger`` of an offloaded model carries them in its session record). The torch side
(tiered ``ExpertStore``, prefetch thread, compute-where-it-is rule, Hugging Face loading, the
trace recorder) is imported on first use by :func:`from_pretrained`, :func:`offload_model`,
:func:`save_experts`, :func:`store_of` and :func:`record_trace`.

::

    import moe_router.offload as mo
    r = mo.simulate(trace, num_experts=64, slots=32, policy="lru")    # r.hit_rates per layer
    model = mo.from_pretrained("tiny-mixtral/", experts_per_layer=4)   # transformers + torch
    mo.store_of(model).metrics()                                       # hits, bytes, stall, ...
    trace = mo.record_trace(model, batches, per_token=True)            # routing of real forwards
"""

from __future__ import annotations

from typing import Any

from .cache import PATHS, ExpertCache, LayerMetrics
from .config import COMPUTE, OffloadConfig
from .policies import POLICIES, make_policy
from .simulate import SimulationResult, simulate
from .synthetic import uniform_trace, zipf_markov_trace
from .trace import RoutingTrace, pinned_from_profile

__all__ = ["COMPUTE", "PATHS", "POLICIES", "ExpertCache", "LayerMetrics", "OffloadConfig",
           "RoutingTrace", "SimulationResult", "from_pretrained", "make_policy",
           "offload_model", "pinned_from_profile", "record_trace", "save_experts", "simulate",
           "store_of",
           "uniform_trace", "zipf_markov_trace"]


def from_pretrained(path: Any, experts_per_layer: int | None = None, **kwargs: Any) -> Any:
    """A Hugging Face MoE checkpoint (``save_pretrained`` folder) loaded with its experts
    offloaded (imports torch and transformers); see
    :func:`moe_router_backends.torch.offload_hf.from_pretrained`."""
    from moe_router_backends.torch.offload_hf import from_pretrained as load

    return load(path, experts_per_layer, **kwargs)


def offload_model(model: Any, config: OffloadConfig | None = None, **kwargs: Any) -> Any:
    """Offload the experts of a torch model's moe-router layers; returns the ``ExpertStore``
    (see :func:`moe_router_backends.torch.offload.offload`)."""
    from moe_router_backends.torch.offload import offload

    return offload(model, config, **kwargs)


def save_experts(model: Any, path: Any) -> None:
    """Write a torch model's experts as a safetensors disk tier for :func:`offload_model`."""
    from moe_router_backends.torch.offload import save_experts as save

    save(model, path)


def store_of(model: Any) -> Any:
    """The ``ExpertStore`` of an offloaded torch model."""
    from moe_router_backends.torch.offload import store_of as get

    return get(model)


def record_trace(model: Any, batches: Any, **kwargs: Any) -> RoutingTrace:
    """The :class:`RoutingTrace` of real forwards of a torch model's moe-router layers, with
    next-router predictions (imports torch); see
    :func:`moe_router_backends.torch.offload_trace.record_trace` (``forward``, ``predict_k``,
    ``per_token``)."""
    from moe_router_backends.torch.offload_trace import record_trace as record

    return record(model, batches, **kwargs)
