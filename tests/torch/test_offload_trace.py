"""Recording routing traces from real torch forwards (``moe_router.offload.record_trace``): the
format, the used experts (checked against the layers' own ``record_routing``), the predictions
(layer l + 1's router applied to layer l's input, recomputed here by hand), a replay of the trace
matching the live store's counts, and the benchmark's trained byte-level LM at toy size."""

from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from offload_models import Residual  # noqa: E402

import moe_router as mr  # noqa: E402
import moe_router.offload as mo  # noqa: E402
from moe_router.errors import InputError  # noqa: E402
from moe_router.torch import MoE  # noqa: E402

pytestmark = [pytest.mark.torch]

ROOT = Path(__file__).resolve().parents[2]
D, F_, E = 32, 48, 8




def _model(n: int = 3) -> Residual:
    mc = mr.MoEConfig(d_model=D, d_ff=F_, router=mr.RouterConfig(num_experts=E, k=2),
                      activation="swiglu", dispatch="torch:loop", init_std=0.02)
    model = Residual([MoE(mc, seed=i).eval() for i in range(n)])
    with torch.no_grad():
        for layer in model.layers[1:]:
            layer.router.weight.mul_(0.5).add_(model.layers[0].router.weight)
    return model


def _manual(layers, run, batches, predict_k):
    """Per batch: the layers' inputs (forward pre-hooks) and routed ids (``record_routing``),
    then each input through the next layer's router by hand (top-``predict_k`` logits)."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, i=i: inputs.__setitem__(i, args[0].detach().reshape(-1, D)))
        for i, layer in enumerate(layers)]
    out = []
    try:
        for batch in batches:
            for layer in layers:
                layer.record_routing(True)
            with torch.no_grad():
                run(batch)
            ids = [layer.record_routing(False).reshape(-1, 2) for layer in layers]
            preds = [None] + [torch.topk(layers[i + 1].router(inputs[i], layers[i + 1].config)
                                         [:, :E], predict_k).indices
                              for i in range(len(layers) - 1)]
            out.append((ids, preds))
    finally:
        for h in hooks:
            h.remove()
    return out


def test_per_token_trace_records_routing_and_next_router_predictions():
    model = _model()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 5, D, generator=g) for _ in range(4)]
    stages = [type(layer._stages()) for layer in model.layers]
    trace = mo.record_trace(model, batches, per_token=True, predict_k=3)
    assert [type(layer._stages()) for layer in model.layers] == stages   # restored
    assert isinstance(trace, mo.RoutingTrace) and trace.num_experts == E
    assert trace.experts.shape == (20, 3, 2) and trace.predicted.shape == (20, 3, 3)
    assert (trace.predicted[:, 0] == -1).all()                 # nothing predicts layer 0
    manual = _manual(list(model.layers), model, batches, 3)
    for b, (ids, preds) in enumerate(manual):
        for t in range(5):
            s = 5 * b + t
            for layer in range(3):
                assert trace.experts[s, layer].tolist() == sorted(ids[layer][t].tolist())
                if layer:
                    assert trace.predicted[s, layer].tolist() == preds[layer][t].tolist()


def test_per_batch_trace_is_the_union_and_replays_to_the_live_store_counts():
    model = _model()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(1, D, generator=g) for _ in range(20)] + [torch.randn(3, D,
                                                                                 generator=g)]
    store = mo.offload_model(model, experts_per_layer=4, prefetch=True, compute="move")
    trace = mo.record_trace(model, batches)        # forwards through the offloaded layers
    live = store.metrics()
    store.close()
    assert trace.steps == len(batches)
    union = [int(e) for e in trace.experts[-1, 1] if e >= 0]   # 3 tokens: the union
    assert 2 <= len(union) <= 6 and union == sorted(set(union))
    sim = mo.simulate(trace, slots=4, prefetch=True, expert_bytes=store.layout.nbytes)
    for key in ("hits", "misses", "prefetch_hits", "prefetch_loads", "prefetch_wasted",
                "predicted", "predicted_used", "used_predicted", "bytes_moved",
                "bytes_wasted"):
        assert [m[key] for m in sim.layers] == [m[key] for m in live["layers"]], key
    assert live["total"]["prefetch_loads"] > 0


def test_record_trace_errors_name_the_argument():
    with pytest.raises(InputError, match="model"):
        mo.record_trace(torch.nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(InputError, match="predict_k"):
        mo.record_trace(_model(), [torch.zeros(1, D)], predict_k=0)
    with pytest.raises(InputError, match="forward"):
        mo.record_trace(list(_model().layers), [torch.zeros(1, D)])
    model = _model(2)
    model.train()
    with pytest.raises(InputError, match="twice"):   # a layer run twice per batch
        mo.record_trace(model, [torch.zeros(1, D)], forward=lambda x: model(model(x)))
    assert model.training and all(layer.training for layer in model.layers)   # restored


def _bench():
    spec = importlib.util.spec_from_file_location("bench_offload",
                                                  ROOT / "benchmarks" / "bench_offload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trained_toy_byte_lm_trace():
    bench = _bench()
    args = argparse.Namespace(lm_layers=3, lm_d=32, lm_experts=8, lm_k=2, lm_d_ff=32, ctx=32,
                              batch=8, train_steps=60, train_bytes=200_000, lr=3e-3,
                              eval_windows=2, seed=0)
    model, record = bench.train_lm(args, log=False)
    assert record["first_train_loss"] > np.log(256) - 0.5       # chance: ~5.5 nats
    assert record["final_train_loss"] < record["first_train_loss"] - 1.0   # it learned
    trace = bench.trained_trace(model, args)
    S = args.eval_windows * args.ctx
    assert trace.experts.shape == (S, 3, 2) and trace.predicted.shape == (S, 3, 4)
    assert ((trace.experts >= 0) & (trace.experts < 8)).all()
    assert all(len(set(row)) == 2 for row in trace.experts.reshape(-1, 2).tolist())
    assert (trace.predicted[:, 0] == -1).all() and (trace.predicted[:, 1:] >= 0).all()
    # the predictions are layer l + 1's router on layer l's input, recomputed by hand
    held = bench.stdlib_bytes(True, S)
    windows = [held[i:i + args.ctx][None] for i in range(0, S, args.ctx)]
    moes = [block.moe for block in model.blocks]
    manual = _manual(moes, model, windows, 4)
    for w, (ids, preds) in enumerate(manual):
        for t in range(args.ctx):
            s = w * args.ctx + t
            for layer in range(3):
                assert trace.experts[s, layer].tolist() == sorted(ids[layer][t].tolist())
                if layer:
                    assert trace.predicted[s, layer].tolist() == preds[layer][t].tolist()
    plain, ahead = bench.replay(trace, 4, None), bench.replay(trace, 4, 2)
    assert plain["recall"] is None and 0 < plain["hit_rate"] < 1
    assert ahead["per_layer_recall"][0] is None and 0 <= ahead["recall"] <= 1
    assert len(ahead["per_layer_hit_rate"]) == 3


def test_recording_keeps_an_offloaded_model_exact():
    model, g = _model(), torch.Generator().manual_seed(2)
    xs = [torch.randn(2, D, generator=g) for _ in range(4)]
    with torch.no_grad():
        ref = [model(x) for x in xs]
    off = copy.deepcopy(model)
    store = mo.offload_model(off, experts_per_layer=2, compute="move")
    outs = []
    mo.record_trace(off, xs, forward=lambda x: outs.append(off(x)))
    store.close()
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
