"""Expert parallelism for JAX: the one layer step inside ``jax.shard_map`` over a mesh axis.

Semantics (the same as the PyTorch EP path): the tokens are split along the ``axis`` of the
mesh (data parallel along that axis); each device routes its own tokens with the full,
replicated router exactly as the single-device layer routes that shard (a capacity is computed
from the shard's T, so drops are per shard); the expert weights are split along the expert
dimension (each device holds L = E / P experts); routed rows travel to the device that owns
their expert, go through its local grouped FFN, and come back; the combine is the usual one.
The reference is the single-device layer applied to each shard separately.

Shapes: P devices on ``axis``, T tokens per shard, K slots per token, S = T*K slots, E experts,
L = E/P local experts, D model width, R rows of the receive buffer.

Exchanges (``exchange=``):

=========================== ====================================================================
``ragged_all_to_all``       the slots sorted by expert are sent with ``jax.lax.ragged_all_to_all``
                            to the owner of their expert, and the outputs come back the same
                            way. Static receive buffer of R = min(P*S, P*L*C) rows (every slot of
                            every shard could pick this device's experts; with a capacity C, an
                            expert takes at most C slots of each shard). XLA:CPU does not
                            implement the collective (jax 0.10): a tiny compile probe, memoised
                            per (platform, P), tells.
``all_gather``              every device gathers all tokens with their ids and gates, runs its own
                            experts on the slots routed to them, and ``psum_scatter`` sums the
                            ``(P*T, D)`` partial outputs back to token shards (P times the
                            traffic of the ragged exchange; runs everywhere).
``ragged_emulated``         the ragged bookkeeping with the collective emulated by
                            ``all_gather`` + gathers (tests the ragged path on CPU).
``auto``                    ``ragged_all_to_all`` where it compiles, else ``all_gather``.
=========================== ====================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_router.backend import Array, Backend
from moe_router.config import MoEConfig
from moe_router.errors import ConfigError, InputError
from moe_router.layer.experts import (
    ExpertWeights,
    expert_weights,
    local_expert_compute,
    permutation,
    slots_per_expert,
    unpermute,
)
from moe_router.layer.state import OBSERVER_PREFIX, ROUTER_STATE, LayerState, state_fields
from moe_router.layer.step import LayerStages, layer_step, stages_for
from moe_router.plan import RouterLosses, RouterState

from .functional import JAX, init_state

EXCHANGES = ("auto", "ragged_all_to_all", "all_gather", "ragged_emulated")
#: per-token inputs that are split with the tokens
PER_TOKEN_ARGS = ("mask", "token_ids", "complexity_scores")


class EPOutput(NamedTuple):
    """What :func:`expert_parallel_apply` returns.

    Attributes:
        y: ``x``'s shape and dtype, split along ``axis`` like ``x``.
        losses: :class:`~moe_router.plan.RouterLosses` of ``(P,)`` float32: each shard's losses.
        mean_losses: :class:`~moe_router.plan.RouterLosses` of scalars: their mean over the axis.
        expert_counts: ``(P, E)`` int, slots each expert received from each shard.
        num_dropped: ``(P,)`` int, slots each shard dropped at the capacity.
        state: the next :class:`LayerState`, identical on every device: counters summed over
            the axis, the controller state averaged, ring buffers taken from shard 0.
    """

    y: jax.Array
    losses: RouterLosses
    mean_losses: RouterLosses
    expert_counts: jax.Array
    num_dropped: jax.Array
    state: LayerState


# ----- the exchange ------------------------------------------------------------------------------
class ExpertParallelStages(LayerStages):
    """The backend's stages with an expert stage that exchanges rows across ``axis`` (no fast
    select: the step always builds the plan here, for the per-shard losses)."""

    def __init__(self, b: Backend, axis: str, num_shards: int, exchange: str) -> None:
        super().__init__(b)
        self.base = stages_for(b)
        self.axis, self.num_shards, self.exchange = axis, num_shards, exchange

    def router_logits(self, x_TD: Array, params: Mapping[str, Array], config: MoEConfig) -> Array:
        return self.base.router_logits(x_TD, params, config)

    def route(self, logits_TE: Array, config: Any, **kwargs: Any) -> Any:
        return self.base.route(logits_TE, config, **kwargs)

    def shared(self, x_TD: Array, params: Mapping[str, Array], config: MoEConfig) -> Array:
        return self.base.shared(x_TD, params, config)

    def restore_shape(self, y_TD: Array, x: Array) -> Array:
        return self.base.restore_shape(y_TD, x)

    def experts(self, x_TD: Array, ids_TK: Array, gates_TK: Array, params: Mapping[str, Array],
                config: MoEConfig, dispatch: str | None) -> Array:
        w = expert_weights(self.b, params, x_TD)  # the local (L, D, F) / (L, F, D) shards
        request = dispatch or config.dispatch
        if self.exchange == "all_gather":
            return _all_gather_experts(self.b, x_TD, ids_TK, gates_TK, w, config, request,
                                       self.axis, self.num_shards)
        collective = (jax.lax.ragged_all_to_all if self.exchange == "ragged_all_to_all"
                      else _emulated_ragged_all_to_all)
        return _ragged_experts(self.b, x_TD, ids_TK, gates_TK, w, config, request, self.axis,
                               self.num_shards, collective)


def _local_ffn(b: Backend, x_ND: Array, ids_NK: Array, gates_NK: Array, w: ExpertWeights,
               config: MoEConfig, request: str, num_local: int, capacity: Any) -> Array:
    """``(N, D)``: the local experts (ids in ``[0, L)``, ``-1`` = not here) on ``x_ND``
    (traced: inside ``shard_map``)."""
    return local_expert_compute(b, x_ND, ids_NK, gates_NK, w, config, request, num_local,
                                capacity=capacity, traced=True)


def _local_capacity(b: Backend, config: MoEConfig, x_TD: Array, num_shards: int) -> Any:
    """Slots a local expert may receive from all shards: P * C, or ``None`` when dropless."""
    C = slots_per_expert(b, config, int(x_TD.shape[0]), x_TD)
    return None if C is None else num_shards * C


def _all_gather_experts(b: Backend, x_TD: Array, ids_TK: Array, gates_TK: Array,
                        w: ExpertWeights, config: MoEConfig, request: str, axis: str,
                        num_shards: int) -> Array:
    """All-gather the tokens, run the local experts on the slots routed to them, reduce-scatter."""
    L = int(w.w_up.shape[0])
    first = jax.lax.axis_index(axis) * L
    x_GD, ids_GK, gates_GK = (jax.lax.all_gather(v, axis, tiled=True)
                              for v in (x_TD, ids_TK, gates_TK))
    here_GK = (ids_GK >= first) & (ids_GK < first + L)
    part_GD = _local_ffn(b, x_GD, jnp.where(here_GK, ids_GK - first, -1),
                         jnp.where(here_GK, gates_GK, 0.0), w, config, request, L,
                         _local_capacity(b, config, x_TD, num_shards))
    return jax.lax.psum_scatter(part_GD, axis, scatter_dimension=0, tiled=True)


def _exclusive_cumsum(v: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(v, axis=axis) - v


def _ragged_experts(b: Backend, x_TD: Array, ids_TK: Array, gates_TK: Array, w: ExpertWeights,
                    config: MoEConfig, request: str, axis: str, num_shards: int,
                    collective: Callable[..., jax.Array]) -> Array:
    """Send each slot's row to its expert's device, run the local experts, send outputs back.

    The send buffer is the S slot rows sorted by expert (so by device); device j's receive
    buffer holds, shard by shard, the rows sent to it, each shard's rows sorted by local expert.
    """
    Pn, E = num_shards, config.num_experts
    L = E // Pn
    me = jax.lax.axis_index(axis)
    perm = permutation(b, ids_TK, E)
    x_SD = b.gather_rows(x_TD, perm.token_S)
    S = int(x_SD.shape[0])
    counts_PPL = jax.lax.all_gather(perm.counts_E.astype(jnp.int32), axis).reshape(Pn, Pn, L)
    sent_PP = counts_PPL.sum(-1)  # [source, destination] rows
    send_off_PP = _exclusive_cumsum(sent_PP, 1)  # where a source's rows for a device start
    recv_off_PP = _exclusive_cumsum(sent_PP, 0)  # where they land on that device
    C = _local_capacity(b, config, x_TD, Pn)
    R = Pn * S if C is None else min(Pn * S, L * C)
    recv_RD = collective(x_SD, jnp.zeros((R, x_SD.shape[1]), x_SD.dtype), send_off_PP[me],
                         sent_PP[me], recv_off_PP[me], sent_PP[:, me], axis_name=axis)
    # local expert of each received row: segments (source, local expert) in that order
    ends_G = jnp.cumsum(counts_PPL[:, me, :].reshape(-1))
    seg_R = jnp.searchsorted(ends_G, jnp.arange(R, dtype=ends_G.dtype), side="right")
    ids_R1 = jnp.where(seg_R < Pn * L, seg_R % L, -1)[:, None]
    out_RD = _local_ffn(b, recv_RD, ids_R1, jnp.ones(ids_R1.shape, x_SD.dtype), w, config,
                        request, L, C)
    back_SD = collective(out_RD, jnp.zeros_like(x_SD), recv_off_PP[:, me], sent_PP[:, me],
                         send_off_PP[:, me], sent_PP[me], axis_name=axis)
    return unpermute(b, back_SD, perm, gates_TK)


def _emulated_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                                send_sizes: jax.Array, output_offsets: jax.Array,
                                recv_sizes: jax.Array, *, axis_name: str) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` (one slice per device) from ``all_gather`` and gathers."""
    del recv_sizes  # implied by the senders' sizes
    me = jax.lax.axis_index(axis_name)
    op_PND = jax.lax.all_gather(operand, axis_name)
    in_off_PP, size_PP, out_off_PP = (jax.lax.all_gather(v, axis_name)
                                      for v in (input_offsets, send_sizes, output_offsets))
    start_P, size_P = out_off_PP[:, me], size_PP[:, me]
    r_R1 = jnp.arange(output.shape[0], dtype=start_P.dtype)[:, None]
    hit_RP = (r_R1 >= start_P) & (r_R1 < start_P + size_P)
    src_R = jnp.argmax(hit_RP, axis=1)
    row_R = in_off_PP[src_R, me] + r_R1[:, 0] - start_P[src_R]
    rows_RD = op_PND[src_R, jnp.clip(row_R, 0, operand.shape[0] - 1)]
    return jnp.where(hit_RP.any(axis=1)[:, None], rows_RD, output)


def ragged_all_to_all_supported(mesh: Mesh, axis: str) -> bool:
    """Whether ``jax.lax.ragged_all_to_all`` over ``axis`` compiles on ``mesh``'s platform
    (a tiny probe, remembered per (platform, axis size) in the registry memo)."""
    from moe_router.registry import default_registry

    platform = mesh.devices.flat[0].platform
    size = int(mesh.shape[axis])

    def probe() -> bool:
        def body(x: jax.Array) -> jax.Array:
            one = jnp.ones((size,), jnp.int32)
            me = jax.lax.axis_index(axis)
            return jax.lax.ragged_all_to_all(x, jnp.zeros_like(x), jnp.cumsum(one) - 1, one,
                                             one * me, one, axis_name=axis)

        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
        try:
            fn.lower(jax.ShapeDtypeStruct((size * size, 1), jnp.float32)).compile()
        except Exception:  # noqa: BLE001 (XLA reports an unimplemented op in various ways)
            return False
        return True

    return bool(default_registry().memo("jax_ragged_all_to_all", (platform, size), probe))


def choose_exchange(exchange: str, mesh: Mesh, axis: str) -> str:
    """The exchange ``exchange`` runs as (``auto`` resolved).

    Raises:
        ConfigError: an unknown name, or ``ragged_all_to_all`` where XLA cannot compile it.
    """
    if exchange not in EXCHANGES:
        raise ConfigError("exchange", exchange, ", ".join(map(repr, EXCHANGES)))
    if exchange in ("all_gather", "ragged_emulated"):
        return exchange
    supported = ragged_all_to_all_supported(mesh, axis)
    if exchange == "auto":
        return "ragged_all_to_all" if supported else "all_gather"
    if not supported:
        platform = mesh.devices.flat[0].platform
        raise ConfigError("exchange", exchange, f"'all_gather' or 'auto' on {platform}: XLA "
                          f"does not compile ragged-all-to-all there (jax {jax.__version__})")
    return exchange


# ----- the functional entry point ----------------------------------------------------------------
def _check(config: MoEConfig, mesh: Mesh, axis: str, x: Any) -> int:
    if axis not in mesh.axis_names:
        raise InputError("axis", f"{axis!r} is not an axis of the mesh {mesh.axis_names}")
    Pn = int(mesh.shape[axis])
    if config.num_experts % Pn:
        raise ConfigError("num_experts", config.num_experts,
                          f"a multiple of the size {Pn} of mesh axis {axis!r} (each device "
                          f"holds num_experts / {Pn} experts)")
    if x.ndim < 2 or x.shape[0] % Pn:
        raise InputError("x", f"expected shape (N, ..., d_model) with N divisible by the size "
                         f"{Pn} of mesh axis {axis!r} (N is split across it), got {x.shape}")
    return Pn


def param_specs(params: Mapping[str, Any], axis: str) -> dict[str, P]:
    """``experts.*`` split along the expert dimension over ``axis``; the rest replicated."""
    return {name: P(axis) if name.startswith("experts.") else P() for name in params}


def _placed(value: Any, mesh: Mesh, spec: P) -> Any:
    """``value`` resharded to ``spec`` where the mesh axes are explicit (shard_map wants the
    arguments' shardings to match then); auto axes are left to shard_map."""
    axes = [a for part in spec if part is not None for a in (part if isinstance(part, tuple)
                                                               else (part,))]
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types[a] == jax.sharding.AxisType.Explicit for a in axes):
        return jax.sharding.reshard(value, NamedSharding(mesh, spec))
    return value


def _sync_state(old: LayerState, new: LayerState, updated: tuple[str, ...], config: MoEConfig,
                axis: str) -> LayerState:
    """One state for all devices: counters ``old + psum(increment)``, the controller state
    averaged (``pmean``), buffers taken from shard 0; entries not updated pass through."""
    fields = state_fields(config)
    observers: dict[str, dict[str, Any]] = {}
    for obs, values in new.observers.items():
        observers[obs] = dict(values)
        for field, value in values.items():
            name = f"{OBSERVER_PREFIX}{obs}.{field}"
            if name not in updated:
                continue
            if fields[name].kind == "counter":
                before = old.observers[obs][field]
                observers[obs][field] = before + jax.lax.psum(value - before, axis)
            else:
                observers[obs][field] = jax.lax.all_gather(value, axis)[0]
    router = new.router
    if router is not None and ROUTER_STATE in updated:
        router = RouterState(*(jax.lax.pmean(v, axis) for v in router))
    return LayerState(router=router, expert_bias=new.expert_bias, observers=observers)


def expert_parallel_apply(params: Mapping[str, jax.Array], x: jax.Array, config: MoEConfig,
                          mesh: Mesh, axis: str = "expert", *, state: LayerState | None = None,
                          training: bool = False, update_state: bool | None = None,
                          rng: Any = None, mask: Any = None, token_ids: Any = None,
                          complexity_scores: Any = None, exchange: str = "auto",
                          dispatch: str | None = None) -> EPOutput:
    """The MoE layer with its experts split over the mesh axis ``axis`` (see the module doc).

    Args:
        params: portable-name weights (``moe_router.flax.init_params``): ``experts.*`` ``(E, ...)``
            are split along E over ``axis`` (:func:`param_specs`), the rest replicated.
        x: ``(N, ..., D)`` float; N is split over ``axis`` (N / P rows per device).
        config: the static :class:`MoEConfig`; ``num_experts`` divisible by P.
        mesh: a ``jax.sharding.Mesh`` with an axis ``axis`` (other axes replicate).
        state: the :class:`LayerState` (default: a fresh one), replicated.
        training / update_state: as in ``moe_router.flax.apply``.
        rng: key for router noise; shard p uses ``jax.random.fold_in(rng, p)``.
        mask / token_ids / complexity_scores: ``x``'s leading shape, split like ``x``.
        exchange: ``auto``, ``ragged_all_to_all``, ``all_gather`` or ``ragged_emulated``.
        dispatch: the local grouped-FFN kernel request (default ``config.dispatch``).

    Returns:
        :class:`EPOutput`; works under ``jax.jit`` and ``jax.grad``.

    Raises:
        ConfigError: E not divisible by P, an unknown ``exchange``, or ``ragged_all_to_all``
            where it does not compile (XLA:CPU).
        InputError: ``axis`` not in the mesh, or N not divisible by P.
    """
    x = jnp.asarray(x)
    Pn = _check(config, mesh, axis, x)
    how = choose_exchange(exchange, mesh, axis)
    stages = ExpertParallelStages(JAX, axis, Pn, how)
    state = init_state(config, params) if state is None else state
    extra = {n: jnp.asarray(v) for n, v in zip(PER_TOKEN_ARGS, (mask, token_ids, complexity_scores))
             if v is not None}
    pspecs = param_specs(params, axis)
    params = dict(params)
    for name, value in params.items():  # the split dim must be E (shard_map checks the rest)
        if pspecs[name] != P() and value.shape[0] != config.num_experts:
            raise InputError(name, f"expected {config.num_experts} experts along dim 0, got "
                             f"shape {value.shape}")

    def body(params: dict[str, jax.Array], state: LayerState, x: jax.Array,
             extra: dict[str, jax.Array], rng: Any) -> tuple[Any, ...]:
        key = None if rng is None else jax.random.fold_in(rng, jax.lax.axis_index(axis))
        out = layer_step(JAX, params, state, x, config, training=training,
                         update_state=update_state, rng=key, dispatch=dispatch, stages=stages,
                         **extra)
        plan = out.plan
        assert plan is not None  # need_plan=True: the step always routes fully here
        losses = RouterLosses(*(jnp.reshape(v, (1,)).astype(jnp.float32) for v in plan.losses))
        means = RouterLosses(*(jax.lax.pmean(v, axis) for v in plan.losses))
        return (out.y, losses, means, plan.expert_counts[None], jnp.reshape(plan.num_dropped, (1,)),
                _sync_state(state, out.state, out.updated, config, axis))

    state_spec = jax.tree.map(lambda _: P(), state)
    extra_spec = {name: P(axis) for name in extra}
    rng_spec = None if rng is None else P()
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(pspecs, state_spec, P(axis), extra_spec, rng_spec),
                       out_specs=(P(axis), P(axis), P(), P(axis), P(axis), state_spec))
    args = ({n: _placed(v, mesh, pspecs[n]) for n, v in params.items()}, state,
            _placed(x, mesh, P(axis)), {n: _placed(v, mesh, P(axis)) for n, v in extra.items()},
            rng)
    return EPOutput(*fn(*args))


def shard_params(params: Mapping[str, jax.Array], mesh: Mesh,
                 axis: str = "expert") -> dict[str, jax.Array]:
    """``params`` on ``mesh``: ``experts.*`` split along E over ``axis``, the rest replicated."""
    specs = param_specs(params, axis)
    return {name: jax.device_put(v, NamedSharding(mesh, specs[name]))
            for name, v in params.items()}


def split_tokens(x: Any, mesh: Mesh, axis: str = "expert") -> jax.Array:
    """``x`` ``(N, ...)`` placed on ``mesh`` with N split over ``axis``."""
    return jax.device_put(x, NamedSharding(mesh, P(axis)))


# ----- Flax NNX ----------------------------------------------------------------------------------
def shard_layer(layer: Any, mesh: Mesh, axis: str = "expert") -> None:
    """Place a ``moe_router.flax.MoE``'s variables on ``mesh`` in place: ``experts/*`` on
    ``NamedSharding(mesh, P(axis, None, None))`` (with ``sharding_names`` metadata, so
    ``nnx.get_partition_spec`` sees it), every other variable replicated.

    Raises:
        ConfigError: ``num_experts`` not divisible by the axis size.
        InputError: ``axis`` not in the mesh.
    """
    from moe_router.weights import param_shapes

    from .layers import MoE

    if not isinstance(layer, MoE):
        raise InputError("layer", f"expected a moe_router.flax.MoE, got {type(layer).__name__}")
    _check(layer.config, mesh, axis, jnp.zeros((int(mesh.shape.get(axis, 1)), 1)))
    names = (*param_shapes(layer.config), *state_fields(layer.config))
    for name in names:
        var = layer._var(name)
        split = name.startswith("experts.")
        spec = P(axis, *([None] * (var[...].ndim - 1))) if split else P()
        var[...] = jax.device_put(var[...], NamedSharding(mesh, spec))
        if split:
            var.set_metadata(sharding_names=tuple(spec))
    layer.aux_loss[...] = jax.device_put(layer.aux_loss[...], NamedSharding(mesh, P()))


def ep_call(layer: Any, x: jax.Array, mesh: Mesh, axis: str = "expert", *,
            training: bool | None = None, mask: Any = None, token_ids: Any = None,
            complexity_scores: Any = None, rng: Any = None, exchange: str = "auto",
            return_output: bool = False) -> jax.Array | tuple[jax.Array, EPOutput]:
    """``layer(x)`` with expert parallelism over ``axis`` (:func:`expert_parallel_apply`);
    usable under ``nnx.jit`` / ``nnx.grad``. The layer state is written back (identical on
    every device: counters summed over the axis); ``layer.aux_loss`` holds the mean over the
    shards of their ``losses.total`` (so ``total_aux_loss`` works as without EP).

    ``return_output=True`` also returns the :class:`EPOutput` (per-shard losses, counts).
    Routing replay (``force_routing``, ``record_routing``) and ``nnx.capture`` sowing are not
    supported here yet.
    """
    if hasattr(layer, "forced_experts") or layer.recording:
        raise InputError("layer", "force_routing / record_routing are not supported by ep_call")
    training = (not layer.deterministic) if training is None else bool(training)
    if training and rng is None and layer.noise_rng is not None:
        rng = layer.noise_rng()
    out = expert_parallel_apply(layer.params_dict(), x, layer.config, mesh, axis,
                                state=layer.layer_state(), training=training,
                                update_state=training or layer.calibrating, rng=rng, mask=mask,
                                token_ids=token_ids, complexity_scores=complexity_scores,
                                exchange=exchange)
    names = tuple(n for n in state_fields(layer.config)
                  if n != ROUTER_STATE or out.state.router is not None)
    layer._write(out.state, names)
    layer.aux_loss[...] = out.mean_losses.total
    return (out.y, out) if return_output else out.y
