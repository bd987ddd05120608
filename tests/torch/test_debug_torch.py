"""The debugger on PyTorch: counters equal a hand count from the plans, in eager mode and under
``torch.compile(fullgraph=True)``; sessions, trace, replay, Hugging Face models."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_router as mr  # noqa: E402
from moe_router.debug import MoEDebugger  # noqa: E402
from moe_router.debug.readout import delta_counts  # noqa: E402
from moe_router.torch import MoE  # noqa: E402

pytestmark = pytest.mark.torch

ROUTER = mr.RouterConfig(num_experts=4, strategy="top_p", top_p=0.6, min_experts=1,
                         max_experts=3, capacity_factor=1.0)
CONFIG = mr.MoEConfig(d_model=8, d_ff=16, router=ROUTER)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([MoE(CONFIG, seed=0), MoE(CONFIG, seed=1)])

    def forward(self, x, mask=None):
        for block in self.blocks:
            x = x + block(x, mask=mask)
        return x


def _hand_count(plans_by_mode, mask_rows):
    """LAYER_COUNTS fields computed from plans with NumPy (the test's own count)."""
    out = {}
    for mode, plans in plans_by_mode.items():
        tokens, counts, k_hist, dropped = 0, np.zeros(4, int), np.zeros(4, int), 0
        for plan, real in zip(plans, mask_rows[mode], strict=True):
            ids = plan.expert_indices.numpy()[real]
            tokens += int(real.sum())
            counts += np.bincount(ids[ids >= 0], minlength=4)
            k_hist += np.bincount((ids >= 0).sum(-1), minlength=4)
            dropped += int(plan.num_dropped)
        out[mode] = dict(tokens=tokens, expert_tokens=counts.tolist(), k_hist=k_hist.tolist(),
                         dropped=dropped, calls=len(plans))
    return out


def _plans_of(net, x, mask, capture):
    """Run ``net`` and capture each layer's plan through a forward hook on return_plan."""
    h = x
    for i, block in enumerate(net.blocks):
        y, plan = block(h, mask=mask, return_plan=True)
        capture[i].append(plan)
        h = h + y
    return h


def test_counters_equal_a_hand_count_from_the_plans():
    net = Net()
    debugger = MoEDebugger(net)
    rng = np.random.default_rng(0)
    plans = {i: {"train": [], "eval": []} for i in range(2)}
    rows = {"train": [], "eval": []}
    with debugger.session("hand"):
        for step in range(4):
            mode = "train" if step % 2 == 0 else "eval"
            net.train(mode == "train")
            x = torch.from_numpy(rng.normal(size=(3, 5, 8)).astype(np.float32))
            mask = torch.from_numpy(rng.random((3, 5)) > 0.3)
            capture = {0: [], 1: []}
            _plans_of(net, x, mask, capture)
            for i in range(2):
                plans[i][mode].extend(capture[i])
            rows[mode].append(mask.numpy().reshape(-1))
            debugger.step()
    record = debugger.to_session()
    for i in range(2):
        want = _hand_count(plans[i], rows)
        for mode in ("train", "eval"):
            got = record["totals"][mode][i]
            for field, value in want[mode].items():
                assert got[field] == value, (i, mode, field)
    assert [s["mode"] for s in record["steps"]] == ["train", "eval", "train", "eval"]
    util = debugger.get_expert_utilization()
    np.testing.assert_allclose(util.sum(axis=1), 1.0)
    train = np.array(record["totals"]["train"][0]["expert_tokens"], float)
    np.testing.assert_allclose(debugger.get_expert_utilization(mode="train")[0],
                               train / train.sum())
    json.dumps(record)  # plain JSON


def test_debugger_off_means_original_layers():
    net = Net()
    before = [b.config for b in net.blocks]
    names = sorted(n for n, _ in net.named_buffers())
    debugger = MoEDebugger(net)
    with debugger.session():
        assert all("routing_stats" in b.config.observers for b in net.blocks)
        assert any("routing_stats" in n for n, _ in net.named_buffers())
        net(torch.randn(2, 8))
    assert [b.config for b in net.blocks] == before
    assert sorted(n for n, _ in net.named_buffers()) == names


def test_compiled_counters_equal_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager, compiled_net = Net(), Net()
    compiled_net.load_state_dict(eager.state_dict())
    d_eager, d_compiled = MoEDebugger(eager, trace=32), MoEDebugger(compiled_net, trace=32)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_net, fullgraph=True, backend=counter)
    rng = np.random.default_rng(1)
    d_eager.start_session()
    d_compiled.start_session()
    for train in (True, True, False, False):
        eager.train(train)
        compiled_net.train(train)
        x = torch.from_numpy(rng.normal(size=(2, 6, 8)).astype(np.float32))
        eager(x)
        compiled(x)
    a, b = d_eager.end_session(), d_compiled.end_session()
    assert counter.frame_count == 2, "one graph per mode (train / eval), no recompilation"
    for mode in ("train", "eval"):
        for la, lb in zip(a["totals"][mode], b["totals"][mode], strict=True):
            for field in ("calls", "tokens", "expert_tokens", "dropped", "k_hist"):
                assert la[field] == lb[field]
            for field in ("entropy_sum", "top1_sum", "z_loss_sum"):
                np.testing.assert_allclose(la[field], lb[field], rtol=1e-5)
    assert len(a["trace"]) == len(b["trace"]) == 64  # 2 layers x capacity 32
    for ra, rb in zip(a["trace"], b["trace"], strict=True):
        assert {k: v for k, v in ra.items() if k != "weights"} == \
            {k: v for k, v in rb.items() if k != "weights"}
        np.testing.assert_allclose(ra["weights"], rb["weights"], rtol=1e-5)


def test_trace_rows_are_the_plans_choices_and_the_ring_wraps():
    layer = MoE(CONFIG, seed=0)
    debugger = MoEDebugger(layer, trace=mr.debug.TraceConfig(capacity=10, tokens_per_call=4))
    rng = np.random.default_rng(2)
    plans = []
    with debugger.session():
        for _ in range(4):  # 4 calls x 4 sampled rows = 16 > capacity 10: wraps
            x = torch.from_numpy(rng.normal(size=(2, 3, 8)).astype(np.float32))
            plans.append(layer(x, return_plan=True, token_ids=torch.arange(6).reshape(2, 3))[1])
        trace = debugger.get_trace()
    assert len(trace) == 10
    assert [r["call"] for r in trace] == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    for row in trace:
        ids = plans[row["call"]].expert_indices[row["index"]].numpy()
        weights = plans[row["call"]].expert_weights[row["index"]].detach().numpy()
        assert row["experts"] == ids[ids >= 0].tolist()
        np.testing.assert_allclose(row["weights"], weights[ids >= 0], rtol=1e-6)
        assert row["token_id"] == row["index"] and row["position"] == row["index"] % 3
    assert [r["index"] for r in trace[2:6]] == [0, 1, 3, 4]  # evenly spaced over T=6


def test_int32_counters_are_read_exactly_across_wraparound():
    last = {"calls": np.array([2 ** 31 - 5, 0], np.int32)}
    now = {"calls": np.array([-(2 ** 31) + 5, 0], np.int32)}  # wrapped after 10 more
    assert delta_counts(now, last, 0)["calls"] == 10


def test_replay_reproduces_outputs_and_balanced_forcing_balances():
    net = Net().eval()
    debugger = MoEDebugger(net)
    x = torch.randn(4, 8)
    with debugger.record_routing() as recorded:
        y = net(x)
    assert sorted(recorded) == ["blocks.0", "blocks.1"]
    with debugger.force_expert_selection(recorded):
        torch.testing.assert_close(net(x), y)
    forced = torch.tensor([[0], [1], [2], [3]])
    with debugger.session(), debugger.force_expert_selection(forced):
        net(x)
        totals = debugger.to_session()["totals"]["eval"]
    assert [t["expert_tokens"] for t in totals] == [[1, 1, 1, 1]] * 2
    top2 = MoE(CONFIG.with_router(strategy="top_k", k=2, capacity_factor=None), seed=0).eval()
    top2_debugger = MoEDebugger(top2)
    with top2_debugger.session(), top2_debugger.force_expert_selection("balanced"):
        top2(torch.randn(16, 8))
        counts = top2_debugger.to_session()["totals"]["eval"][0]["expert_tokens"]
    assert counts == [8, 8, 8, 8]
    assert not top2.config.router.balanced_debug and "routing_stats" not in top2.config.observers
    assert net.blocks[0].forced_routing is None
    with pytest.raises(mr.InputError, match="forced_experts"):
        net.blocks[0](x, forced_experts=torch.tensor([[7]] * 4))


def test_hf_model_statistics_match_a_hand_count():
    transformers = pytest.importorskip("transformers")
    from moe_router.torch import replace_moe_blocks

    config = transformers.MixtralConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, intermediate_size=48,
        num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    assert replace_moe_blocks(model) == 2
    debugger = MoEDebugger(model)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(debugger.layer_names) == 2 and all(".mlp" in n for n in debugger.layer_names)
    counts = [np.zeros(4, int) for _ in layers]

    def count(i):
        def hook(module, args, output):
            ids = module.last_plan.expert_indices.numpy()
            counts[i] += np.bincount(ids[ids >= 0], minlength=4)
        return hook

    handles = [layer.register_forward_hook(count(i)) for i, layer in enumerate(layers)]
    ids = torch.randint(0, 97, (2, 7))
    with debugger.session("hf"):
        model(ids)
        model.generate(ids[:, :3], max_new_tokens=3, do_sample=False)
        record = debugger.to_session()
    for h in handles:
        h.remove()
    for i in range(2):
        assert record["totals"]["eval"][i]["expert_tokens"] == counts[i].tolist()
        assert record["totals"]["eval"][i]["tokens"] == counts[i].sum() // 2


def test_detaching_keeps_routing_changes_made_during_the_session():
    net = Net()
    debugger = MoEDebugger(net)
    with debugger.session():
        for block in net.blocks:  # what set_strategy does: a new routing config
            block.config = block.config.with_router(top_p=0.3)
        net(torch.randn(3, 8))
    assert all(b.config.router.top_p == 0.3 and b.config.observers == () for b in net.blocks)
    assert len(debugger.to_session()["steps"]) == 1  # the calls after the last step() closed one
