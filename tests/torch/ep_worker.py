"""One rank of the expert-parallel equality tests (``tests/torch/test_expert_parallel_torch.py``).

Launched by ``torchrun --standalone --nproc-per-node W tests/torch/ep_worker.py OUT CASE...``:
every rank runs each named case (the gloo backend, CPU, a 60 s collective timeout, so a hang
fails) and writes ``OUT/rank<r>.json``: per case, the largest absolute differences from the
single-process reference and the facts the tests assert on.

The reference, computed on every rank: the single-process layer with the same weights, applied
to each rank's tokens in turn, loss = sum over ranks of ``sum(y * g) + aux_loss``; gradients
accumulate over the ranks' calls. The expert-parallel model sees only its rank's tokens; after
``sync_gradients(average=False)`` its gradients must equal the reference's (its local experts'
slices for expert parameters).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_router import MoEConfig, RouterConfig
from moe_router.parallel import plan_placement
from moe_router.torch import (
    MoE,
    expert_parallel,
    expert_parallel_groups,
    gather_experts,
    sync_gradients,
)

D, F, E = 16, 32, 8


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    if a.shape != b.shape:
        return float("inf")
    return 0.0 if a.numel() == 0 else float((a.detach() - b.detach()).abs().max())


def _tokens(case: str, rank: int, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's tokens ``x_r`` and output cotangents ``g_r`` (all ranks build all)."""
    sizes = {"unequal": [6 + 5 * r for r in range(world)],
             "zero_tokens": [0 if r == 1 else 12 for r in range(world)]}.get(case,
                                                                            [12] * world)
    xs = [_randn(100 + r, n, D) for r, n in enumerate(sizes)]
    if case == "capacity_one_rank":  # rank 0: one token repeated: its experts overflow
        xs[0] = xs[0][:1].repeat(sizes[0], 1)
    gs = [_randn(200 + r, n, D) for r, n in enumerate(sizes)]
    return xs, gs


def layer_case(case: str, config: MoEConfig, *, groups: Any = None, placement: Any = None,
               forced: Callable[[int], torch.Tensor] | None = None,
               average: bool = False) -> dict[str, Any]:
    world, rank = dist.get_world_size(), dist.get_rank()
    xs, gs = _tokens(case, rank, world)
    ref = MoE(config, seed=0).train()
    ep = copy.deepcopy(ref)
    mine: dict[str, Any] = {}
    for r in range(world):
        x = xs[r].clone().requires_grad_(True)
        kwargs = {} if forced is None else {"forced_experts": forced(x.shape[0])}
        y, plan = ref(x, return_plan=True, **kwargs)
        ((y * gs[r]).sum() + plan.losses.total).backward()
        if r == rank:
            mine = {"y": y.detach(), "aux": plan.losses.total.detach(), "x_grad": x.grad,
                    "dropped": int(plan.num_dropped)}
    expert_parallel(ep, groups=groups, placement=placement)
    full = dict(ref.named_parameters())
    gathered = max(_max_diff(t, full[name]) for name, t in gather_experts(ep).items())
    x = xs[rank].clone().requires_grad_(True)
    kwargs = {} if forced is None else {"forced_experts": forced(x.shape[0])}
    y, plan = ep(x, return_plan=True, **kwargs)
    ((y * gs[rank]).sum() + plan.losses.total).backward()
    sync_gradients(ep, groups, average=average)
    scale = world if average else 1
    local = torch.tensor(ep._stages()._ep.local_experts)
    grads = {}
    for name, p in ref.named_parameters():
        want = p.grad / scale
        if name.startswith("experts."):
            want = want[local]
        grads[name] = _max_diff(dict(ep.named_parameters())[name].grad, want)
    stats = ep._stages()._ep.last_exchange
    return {"y": _max_diff(y, mine["y"]), "aux": _max_diff(plan.losses.total, mine["aux"]),
            "x_grad": _max_diff(x.grad, mine["x_grad"]), "grads": grads, "gathered": gathered,
            "max_grad": max(grads.values()), "tokens": int(x.shape[0]),
            "dropped": int(plan.num_dropped), "ref_dropped": mine["dropped"],
            "received_rows": sum(stats.received_P), "sent_rows": sum(stats.sent_P),
            "local_experts": list(ep._stages()._ep.local_experts)}


def _config(**router: Any) -> MoEConfig:
    shared = router.pop("num_shared_experts", 0)
    return MoEConfig(d_model=D, d_ff=F, num_shared_experts=shared,
                     router=RouterConfig(num_experts=E, **router))


def stats_case() -> dict[str, Any]:
    """Counters pooled over ranks: the aux-free bias step and the debugger see every rank."""
    from moe_router.debug import MoEDebugger

    world, rank = dist.get_world_size(), dist.get_rank()
    config = _config(k=2, use_expert_bias=True, bias_update_rate=0.01)
    ref = MoE(config, seed=0).train()
    ep = copy.deepcopy(ref)
    xs, _ = _tokens("equal", rank, world)
    counts = torch.zeros(E)
    for r in range(world):
        counts += ref(xs[r], return_plan=True)[1].expert_counts.float()
    ref_bias = ref.update_expert_bias(counts)
    expert_parallel(ep)
    debugger = MoEDebugger(ep)
    debugger.attach()
    y, plan = ep(xs[rank], return_plan=True)
    session = debugger.to_session()
    ep_bias = ep.update_expert_bias()
    train = session["totals"]["train"][0]
    return {"bias": _max_diff(ep_bias, ref_bias),
            "debugger_tokens": train["tokens"], "debugger_expert_tokens": train["expert_tokens"],
            "expected_expert_tokens": counts.long().tolist(),
            "cover": session["layers"][0]["counters_cover"]}


def controller_case() -> dict[str, Any]:
    """A stateful router (top-p controller): the state stays the same on every rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = MoE(_config(strategy="top_p", top_p=0.5, target_experts=1.5), seed=0).train()
    expert_parallel(ep)
    xs, _ = _tokens("equal", rank, world)
    for step in range(3):
        ep(_randn(300 + 10 * step + rank, 12, D))
    state = ep.router.state.detach().clone()
    gathered = [torch.zeros_like(state) for _ in range(world)]
    dist.all_gather(gathered, state)
    return {"state_spread": max(_max_diff(g, state) for g in gathered),
            "state_moved": _max_diff(state, MoE(ep.config, seed=0).router.state)}


def hf_case() -> dict[str, Any]:
    """A transformers Mixtral with experts_implementation='moe_router', expert-parallel."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from moe_router.torch import use_moe_router_experts
    from tests.hf_families import FAMILIES

    world, rank = dist.get_world_size(), dist.get_rank()
    ref = FAMILIES["mixtral"].build(seed=0, num_local_experts=4).train()
    use_moe_router_experts(ref)
    ep = copy.deepcopy(ref)
    ids = [torch.randint(2, 99, (2, 5 + r), generator=torch.Generator().manual_seed(r))
           for r in range(world)]
    mine = None
    for r in range(world):
        logits = ref(input_ids=ids[r]).logits
        logits.square().mean().backward()
        if r == rank:
            mine = logits.detach()
    converted = expert_parallel(ep)
    full = dict(ref.named_parameters())
    gathered = gather_experts(ep)
    gathered_diff = max(_max_diff(t, full[name]) for name, t in gathered.items())
    logits = ep(input_ids=ids[rank]).logits
    logits.square().mean().backward()
    sync_gradients(ep, average=False)
    ep_params = dict(ep.named_parameters())
    worst = 0.0
    for name, p in ref.named_parameters():
        want = p.grad
        mod = ep.get_submodule(name.rpartition(".")[0])
        link = mod.__dict__.get("_moe_router_expert_parallel")
        if link is not None and want is not None and want.shape[0] == 4:
            want = want[torch.tensor(link.local_experts)]
        worst = max(worst, _max_diff(ep_params[name].grad, want))
    return {"converted": converted, "logits": _max_diff(logits, mine), "max_grad": worst,
            "gathered": gathered_diff, "gathered_names": len(gathered)}


def errors_case() -> dict[str, Any]:
    """Typed errors naming the argument: E not divisible, a placement of the wrong size, a
    second conversion, a bad ep_size, offload and expert parallelism combined (either order)."""
    import moe_router.offload as mo
    from moe_router.errors import MoERouterError
    from moe_router.parallel import contiguous_placement

    world = dist.get_world_size()
    attempts = {
        "num_experts": lambda: expert_parallel(MoE(MoEConfig(
            d_model=D, d_ff=F, router=RouterConfig(num_experts=5, k=1)), seed=0)),
        "placement": lambda: expert_parallel(MoE(_config(k=2), seed=0),
                                             placement=contiguous_placement(2 * E, world)),
        "ep_size": lambda: expert_parallel_groups(3),
    }
    twice = MoE(_config(k=2), seed=0)
    expert_parallel(twice)
    attempts["layer_or_model"] = lambda: expert_parallel(twice)
    attempts["offload_after_ep"] = lambda: mo.offload_model(twice, experts_per_layer=2)
    offloaded = MoE(_config(k=2), seed=0)
    store = mo.offload_model(offloaded, experts_per_layer=2)
    attempts["ep_after_offload"] = lambda: expert_parallel(offloaded)
    found = {}
    for expected, attempt in attempts.items():
        try:
            attempt()
            found[expected] = "no error"
        except MoERouterError as err:
            named = getattr(err, "argument", None) or getattr(err, "field", None)
            found[expected] = f"{type(err).__name__}:{named}"
    store.close()
    return found


def run_case(case: str) -> dict[str, Any]:
    world = dist.get_world_size()
    forced_two = (lambda T: torch.tensor([[0, 1]] * T, dtype=torch.long))  # noqa: E731
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        "top_k": lambda: layer_case("unequal", _config(k=2, num_shared_experts=1)),
        "top_p": lambda: layer_case("equal", _config(strategy="top_p", top_p=0.5)),
        "capacity": lambda: layer_case("equal", _config(k=2, capacity_factor=0.5)),
        "capacity_one_rank": lambda: layer_case("capacity_one_rank",
                                                _config(k=2, capacity_factor=2.0)),
        "zero_tokens": lambda: layer_case("zero_tokens", _config(k=2)),
        "idle_experts": lambda: layer_case("equal", _config(k=2), forced=forced_two),
        "average": lambda: layer_case("unequal", _config(k=2), average=True),
        "replicas": lambda: layer_case(
            "equal", _config(k=2), forced=lambda T: torch.stack(
                [torch.zeros(T, dtype=torch.long), torch.arange(T) % (E - 1) + 1], 1),
            placement=plan_placement([50.0] + [5.0] * (E - 1), world, num_redundant=world)),
        "ep_x_edp": lambda: layer_case("unequal", _config(k=2),
                                       groups=expert_parallel_groups(world // 2)),
        "stats": stats_case,
        "controller": controller_case,
        "hf": hf_case,
        "errors": errors_case,
    }
    return cases[case]()


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    for name in names:
        try:
            results[name] = run_case(name)
        except Exception:  # noqa: BLE001 (reported per case; the rank goes on)
            results[name] = {"error": traceback.format_exc()}
            print(f"rank {rank}, case {name}:\n{results[name]['error']}", file=sys.stderr,
                  flush=True)
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
