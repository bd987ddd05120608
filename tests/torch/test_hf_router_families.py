"""``replace_routers`` on every experts-seam family of the installed transformers (the catalog
``tests/hf_families.py``): our static top-k reproduces each understood family exactly, a dynamic
``top_p`` lowers the experts per token and still generates, and the families whose gate we do not
understand are refused with a clear error (never guessed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_families import FAMILIES, ROUTER_REFUSED  # noqa: E402

from moe_router.errors import InputError  # noqa: E402
from moe_router_backends.torch.hf_router import replace_routers, seam_blocks  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.hf]
NAMES = sorted(FAMILIES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str):
    """The family's tiny model with random (trained-like) gate weights: a fresh config's router
    may be all zeros, where every choice is a tie."""
    model = FAMILIES[name].build(seed=0)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, _, gate in seam_blocks(model):
            for param in gate.parameters():
                if param.dim() == 2:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def _output(model, ids):
    out = model(ids)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


@pytest.mark.parametrize("name", NAMES)
def test_family_is_reproduced_and_routes_dynamically_or_is_refused(name: str):
    model = _model(name)
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    if name in ROUTER_REFUSED:
        with pytest.raises(InputError, match=ROUTER_REFUSED[name][0]):
            replace_routers(model)
        return
    with torch.no_grad():
        ref = _output(model, ids)
        stock_tokens = _generate(name, model, ids)
        static = replace_routers(model)
        assert not static["dynamic"] and static["experts_implementation"] is None
        torch.testing.assert_close(_output(model, ids), ref, atol=1e-5, rtol=1e-5)
        if stock_tokens is not None:
            assert torch.equal(_generate(name, model, ids), stock_tokens)  # greedy: identical
        k_static = next(seam_blocks(model))[2].__dict__["_moe_router"].base.k
        dynamic = replace_routers(model, strategy="top_p", top_p=0.5, max_experts=k_static)
        assert dynamic["experts_implementation"] == "moe_router"
        used = []
        handles = [gate.register_forward_hook(lambda m, a, out: used.append(out[2] >= 0))
                   for _, _, gate in seam_blocks(model)]
        _output(model, ids)
        for handle in handles:
            handle.remove()
        mean_k = torch.cat([u.sum(-1).float() for u in used]).mean().item()
        assert 1.0 <= mean_k <= k_static
        if FAMILIES[name].generates:
            out = model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False)
            assert out.shape[-1] in (5, 6)  # 5: the model chose the end-of-sequence token


def _generate(name: str, model, ids):
    """Greedy tokens of a causal LM, ``None`` for other heads."""
    if not FAMILIES[name].generates:
        return None
    return model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)


def _choices(model, ids) -> list[torch.Tensor]:
    """Each gate's chosen experts (sorted per token) in one forward."""
    seen: list[torch.Tensor] = []
    handles = [gate.register_forward_hook(
        lambda m, a, out: seen.append(torch.sort(out[2], -1).values))
        for _, _, gate in seam_blocks(model)]
    with torch.no_grad():
        _output(model, ids)
    for handle in handles:
        handle.remove()
    return seen


def _bf16(model):
    """``model`` in bfloat16 the way ``from_pretrained(dtype=torch.bfloat16)`` loads it: the
    modules the family keeps in float32 (``_keep_in_fp32_modules[_strict]``) stay float32."""
    model.to(torch.bfloat16)
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) | set(
        getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and any(pattern in name for pattern in keep):
            tensor.data = tensor.data.float()
    return model


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ROUTER_REFUSED])
def test_bf16_choices_equal_the_familys_own(name: str):
    """In bfloat16 the wrapped gate picks exactly the experts the family's gate picks, layer by
    layer from the same hidden states (the gate's own logits, in its own dtype)."""
    model = _bf16(_model(name))
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(2))
    stock = _choices(model, ids)
    replace_routers(model)
    ours: list[torch.Tensor] = []
    handles = []
    for _, _, gate in seam_blocks(model):  # compare on the stock inputs: feed each gate the same
        def both(m, args, out, store=ours):
            store.append(torch.sort(out[2], -1).values)
        handles.append(gate.register_forward_hook(both))
    with torch.no_grad():
        _output(model, ids)
    for handle in handles:
        handle.remove()
    assert torch.equal(ours[0], stock[0])  # the first MoE layer sees identical hidden states


def _mean_k(name: str) -> tuple[float, int]:
    model = _model(name)
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        replace_routers(model)
        k_static = next(seam_blocks(model))[2].__dict__["_moe_router"].base.k
        replace_routers(model, strategy="top_p", top_p=0.5, max_experts=k_static)
        used = []
        handles = [gate.register_forward_hook(lambda m, a, out: used.append(out[2] >= 0))
                   for _, _, gate in seam_blocks(model)]
        _output(model, ids)
    for handle in handles:
        handle.remove()
    return torch.cat([u.sum(-1).float() for u in used]).mean().item(), k_static


def test_dynamic_routing_lowers_k_on_at_least_20_families():
    lowered = {}
    for name in NAMES:
        if name in ROUTER_REFUSED:
            continue
        mean_k, k_static = _mean_k(name)
        if mean_k < k_static:
            lowered[name] = round(mean_k, 2)
    assert len(lowered) >= 20, lowered
