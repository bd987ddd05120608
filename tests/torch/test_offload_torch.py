"""The torch expert store: offloaded layers equal the in-memory ones bit for bit, read one expert at
a time, stay within their budget, prefetch what the next router predicts, and load tiny
save_pretrained Mixtral / Qwen3-MoE checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest

torch = pytest.importorskip("torch")

from offload_models import Residual  # noqa: E402

import moe_router as mr  # noqa: E402
import moe_router.offload as mo  # noqa: E402
from moe_router.errors import InputError, InputTypeError  # noqa: E402
from moe_router.torch import MoE  # noqa: E402

pytestmark = [pytest.mark.torch]

D, F_, E = 32, 48, 8




def _model(n=3, shared_router=False, std=0.02):
    mc = mr.MoEConfig(d_model=D, d_ff=F_, router=mr.RouterConfig(num_experts=E, k=2),
                      activation="swiglu", dispatch="torch:loop", init_std=std)
    layers = [MoE(mc, seed=i).eval() for i in range(n)]
    if shared_router:
        for layer in layers[1:]:
            layer.router.weight.data.copy_(layers[0].router.weight.data)
    return Residual(layers)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, D, generator=g) for _ in range(12)] + [torch.randn(6, D, generator=g)]


def _run(model, xs):
    with torch.no_grad():
        return [model(x) for x in xs]


@pytest.mark.parametrize("policy", mo.POLICIES)
@pytest.mark.parametrize("slots", [1, 4])
@pytest.mark.parametrize("tier", ["disk", "host"])
def test_offloaded_layers_are_bit_identical(tmp_path, policy, slots, tier):
    model, xs = _model(), _inputs()
    ref = _run(model, xs)
    computes = ["move", "auto"] + (["there"] if tier == "host" else [])
    for compute in computes:
        off = copy.deepcopy(model)
        checkpoint = None
        if tier == "disk":
            checkpoint = tmp_path / "experts.safetensors"
            mo.save_experts(off, checkpoint)
        store = mo.offload_model(off, experts_per_layer=slots, policy=policy, compute=compute,
                                 checkpoint=checkpoint)
        out = _run(off, xs)
        store.close()
        assert all(torch.equal(a, b) for a, b in zip(ref, out)), (compute, policy)
        paths = store.metrics()["total"]["paths"]
        assert sum(paths.values()) == store.metrics()["total"]["hits"] + \
            store.metrics()["total"]["misses"]
        if compute == "there":
            assert paths["there"] > 0 and paths["moved"] == 0
        if slots == 1 and compute == "move" and policy != "layer_aware":
            assert paths["streamed"] > 0  # k = 2 experts, 1 slot: the second one streams


def test_disk_tier_reads_one_expert_at_a_time_and_stays_in_budget(tmp_path):
    model, xs = _model(), _inputs()
    path = tmp_path / "experts.safetensors"
    mo.save_experts(model, path)
    file_bytes = os.path.getsize(path)
    store = mo.offload_model(model, experts_per_layer=E // 2, checkpoint=path, prefetch=True)
    expert_bytes = store.layout.nbytes
    budget = 3 * (E // 2) * expert_bytes
    assert store.capacity_bytes == budget + expert_bytes  # the pool and one staging expert
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if "experts" in n)
    for x in xs:
        with torch.no_grad():
            model(x)
        assert store.resident_bytes <= budget
    reads = store.metrics()["reads"]
    assert reads["max_read"] == D * F_ * 4  # one role of one expert: never more at once
    assert reads["max_read"] < file_bytes / (3 * E)
    measured = 2 * expert_bytes  # the start-up copy timing (compute="auto") reads expert 0 twice
    assert reads["bytes_read"] == store.metrics()["total"]["bytes_moved"] + measured
    assert reads["reads"] == 3 * reads["bytes_read"] // expert_bytes  # 3 tensors per expert
    assert store.metrics()["total"]["peak_resident_bytes"] <= budget
    store.close()


def test_prefetch_from_the_next_router_is_measured():
    model, xs = _model(n=4, shared_router=True), _inputs()[:12]
    off = copy.deepcopy(model)
    store = mo.offload_model(off, experts_per_layer=4, prefetch=True, compute="move")
    assert torch.equal(torch.cat(_run(model, xs)), torch.cat(_run(off, xs)))
    m = store.metrics()
    store.close()
    assert m["layers"][0]["recall"] is None  # nothing predicts layer 0
    assert m["total"]["prefetch_loads"] > 0 and m["total"]["recall"] >= 0.8
    assert m["total"]["prefetch_hits"] > 0
    assert m["total"]["stall_s"] > 0
    plain = copy.deepcopy(model)
    no_prefetch = mo.offload_model(plain, experts_per_layer=4, prefetch=False, compute="move")
    _run(plain, xs)
    no_prefetch.close()
    assert m["total"]["hit_rate"] > no_prefetch.metrics()["total"]["hit_rate"]


def test_compute_where_it_is_rule_is_counted_and_follows_the_costs():
    model, xs = _model(), _inputs()
    store = mo.offload_model(model, experts_per_layer=2, compute="auto")
    _run(model, xs)
    costs = store.costs
    assert costs.copy_bytes_per_s > 0 and costs.host_flops > 0
    expected = costs.choose(1, store.layout, True)
    paths = store.metrics()["total"]["paths"]
    assert paths["there" if expected == "there" else "moved"] > 0
    store.close()


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(InputError, match="model"):
        mo.offload_model(torch.nn.Linear(2, 2), experts_per_layer=1)
    with pytest.raises(InputTypeError, match="model"):
        mo.store_of(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="path"):
        mo.from_pretrained(tmp_path, experts_per_layer=2)


# ----- Hugging Face checkpoints ---------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf(family):
    t = transformers
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
    if family == "mixtral":
        config = t.MixtralConfig(**common, intermediate_size=48, num_local_experts=4,
                                 num_experts_per_tok=2)
        cls = t.MixtralForCausalLM
    else:
        config = t.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                  num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                  head_dim=8)
        cls = t.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.hf
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_from_pretrained_half_the_experts_is_bit_identical(tmp_path, family):
    from moe_router_backends.torch.offload_hf import in_memory_reference

    stock = _hf(family)
    stock.save_pretrained(tmp_path)
    ref = in_memory_reference(tmp_path)
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        want_gen = ref.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.allclose(want, stock(ids).logits, atol=1e-5)
    cases = [dict(policy=p) for p in mo.POLICIES] + [
        dict(compute="there", host_tier=True), dict(compute="auto", host_tier=True),
        dict(prefetch=False), dict(pinned={0: (0,), 1: (1,)})]
    for case in cases:
        model = mo.from_pretrained(tmp_path, experts_per_layer=2, **case)
        store = mo.store_of(model)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want), case
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                               want_gen), case
        store.close()
        m = store.metrics()
        assert m["total"]["peak_resident_bytes"] <= 2 * 2 * store.layout.nbytes
        assert all(p.device.type == "meta" for n, p in model.named_parameters()
                   if ".experts." in n)
        if not case.get("host_tier"):
            assert m["reads"]["max_read"] <= max(store.layout.nbytes // 3, 97 * 32 * 4)


@pytest.mark.hf
def test_from_pretrained_budget_in_bytes(tmp_path):
    _hf("mixtral").save_pretrained(tmp_path)
    one = 3 * 32 * 48 * 4
    model = mo.from_pretrained(tmp_path, budget_bytes=2 * 3 * one, compute="move")
    store = mo.store_of(model)
    assert store.slots == 3
    store.close()
    changed = dataclasses.replace(store.config, experts_per_layer=1, budget_bytes=None)
    assert changed.slots(2, 4, one) == 1
