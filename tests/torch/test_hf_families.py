"""Every transformers MoE family behind the experts seam, with every experts implementation.

For each family of ``tests/hf_families.py`` (a tiny random model, float32, CPU, seeded):

(a) switching ``experts_implementation`` between ``eager``, ``grouped_mm``, ``batched_mm`` and
    ``moe_router`` gives the same outputs (atol 1e-5), and the switch reaches every experts
    module; in bfloat16, ``moe_router`` matches ``grouped_mm``;
(b) greedy ``generate`` gives the same tokens with every implementation;
(c) a model saved with ``moe_router`` (or ``grouped_mm``) active loads in stock transformers
    (``eager``) with the same weights and outputs;
(d) the model's own init path initialises every parameter and buffer, also after construction
    on the meta device (``to_empty`` + ``init_weights``), as from ``__init__``;
(e) the tensor- and expert-parallel plans name existing modules / parameters;
(f) ``labels`` gives a loss with gradients, the same with every implementation;
    ``output_router_logits=True`` gives router logits, and the aux loss reaches the loss where
    the family has one;
and the gate facts of the catalog hold on the running model.

One model per family is built and reused (``_built``); the eager references are computed once.
``moe_router`` cases skip, saying why, while ``moe_router.torch.register_hf_experts`` is not
importable. Failures of transformers itself are the catalog's ``upstream`` entries (strict
expected failures) and the ``test_upstream_*`` tests at the end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_families import (  # noqa: E402
    DOCS_PAGE,
    EXCLUDED,
    FAMILIES,
    UPSTREAM_ISSUES,
    Family,
    render_table,
    seam_families,
)

pytestmark = [pytest.mark.torch, pytest.mark.hf]

NAMES = sorted(FAMILIES)
#: the implementations compared with ``eager``
IMPLS = ("grouped_mm", "batched_mm", "moe_router")
ATOL = RTOL = 1e-5
#: a token id none of the tiny models generates (vocabulary 99), so generation never stops early
NO_EOS = 10_000
_PROBE = "hf_families_probe"


def _moe_router_missing() -> str | None:
    """Why ``"moe_router"`` cannot be used (None when it can); registers it when it can."""
    try:
        from moe_router.torch import register_hf_experts
    except ImportError as exc:  # the lead's experts implementation is not there (yet)
        return f"moe_router.torch.register_hf_experts is not importable: {exc}"
    register_hf_experts()
    return None


def _need(impl: str) -> None:
    if impl == "moe_router" and (why := _moe_router_missing()):
        pytest.skip(why)


def _use(model, impl: str) -> None:
    """Switch ``model`` (and its sub-models) to the experts implementation ``impl``."""
    if callable(getattr(model, "set_experts_implementation", None)):
        model.set_experts_implementation(impl)
    else:
        model.config._experts_implementation = impl
    assert all(m.config._experts_implementation == impl for m in _experts(model))


def _experts(model) -> list:
    """The experts modules of ``model`` (classes decorated with ``@use_experts_implementation``)."""
    return [m for m in model.modules() if hasattr(type(m), "_apply_gate")
            and isinstance(getattr(m, "_is_expert_parallel", None), bool)]


def _main(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


@dataclass
class Built:
    family: Family
    model: Any
    ids: torch.Tensor  # (2, 9)
    prompt: torch.Tensor  # (1, 5)
    cache: dict[str, Any] = field(default_factory=dict)

    def forward(self, impl: str, **kwargs) -> Any:
        _use(self.model, impl)
        with torch.no_grad():
            return self.model(self.ids, **kwargs)

    def reference(self) -> torch.Tensor:
        if "forward" not in self.cache:
            self.cache["forward"] = _main(self.forward("eager"))
        return self.cache["forward"]

    def generate(self, impl: str) -> torch.Tensor:
        _use(self.model, impl)
        with torch.no_grad():
            return self.model.generate(self.prompt, max_new_tokens=4, do_sample=False,
                                       eos_token_id=NO_EOS, pad_token_id=0)

    def loss_and_grads(self, impl: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (``labels`` where the head takes them) and every parameter's gradient."""
        model = self.model
        _use(model, impl)
        model.zero_grad(set_to_none=True)
        if self.family.has_labels:
            labels = self.ids if self.family.generates else self.ids % 2  # 2 token classes
            loss = model(self.ids, labels=labels).loss
        else:
            loss = model(self.ids).last_hidden_state.pow(2).mean()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads


@functools.cache
def _built(name: str) -> Built:
    family = FAMILIES[name]
    model = family.build(seed=0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, 9), generator=gen)
    return Built(family, model, ids, ids[:1, :5].clone())


@pytest.fixture(params=NAMES)
def family(request) -> str:
    return request.param


def _upstream(request, family: str, check: str) -> None:
    """Mark the running test as an expected (strict) failure when transformers itself fails
    ``check`` for ``family`` (the catalog's ``upstream`` entries)."""
    reason = FAMILIES[family].upstream.get(check)
    if reason:
        request.applymarker(pytest.mark.xfail(reason=f"transformers: {reason}", strict=True))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared machine torch's thread pool
    spinning for work of microseconds makes each forward 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- catalog and docs --------------------------------------------------------------------------
def test_catalog_covers_every_seam_family():
    """Every family of the installed transformers that uses the seam is tested or excluded."""
    seam = set(seam_families())
    assert not set(FAMILIES) & set(EXCLUDED)
    assert set(FAMILIES) | set(EXCLUDED) == seam, (
        f"not in the catalog: {sorted(seam - set(FAMILIES) - set(EXCLUDED))}; "
        f"no longer seam families: {sorted((set(FAMILIES) | set(EXCLUDED)) - seam)}")
    assert len(FAMILIES) >= 20


def test_docs_page_lists_every_family_and_is_in_sync():
    page = DOCS_PAGE.read_text(encoding="utf-8")
    for name in [*FAMILIES, *EXCLUDED]:
        assert f"`{name}`" in page, f"{name} missing from {DOCS_PAGE.name}"
    assert render_table() in page, (
        f"{DOCS_PAGE.name} is out of date with tests/hf_families.py: run "
        "`python tests/hf_families.py`")


# ----- (a) the seam: same outputs, every experts module reached ----------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_eager(family, impl):
    _need(impl)
    built = _built(family)
    reference = built.reference()
    out = _main(built.forward(impl))
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=RTOL)


@contextlib.contextmanager
def _probe_implementation():
    """Register an experts implementation that records which modules it runs (delegating to
    ``grouped_mm``); yields the list of ``(module, output)`` it ran."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    delegate = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    calls: list[tuple[Any, torch.Tensor]] = []

    def probe(self, hidden_states, top_k_index, top_k_weights):
        out = delegate(self, hidden_states, top_k_index, top_k_weights)
        calls.append((self, out))
        return out

    ExpertsInterface.register(_PROBE, probe)
    try:
        yield calls
    finally:
        ExpertsInterface._global_mapping.pop(_PROBE, None)
        ALL_EXPERTS_FUNCTIONS._local_mapping.pop(_PROBE, None)


def test_switch_reaches_every_experts_module(family):
    """``set_experts_implementation`` reaches every experts module, each runs once per forward
    and contributes a non-zero output (so the comparisons above do test the seam)."""
    built = _built(family)
    layers = _layers(built.model)
    idle = {id(layer.get_submodule(path)) for layer in layers.values()
            for path in built.family.idle_experts if _has(layer, path)}
    expected = [m for m in _experts(built.model) if id(m) not in idle]
    assert expected, "no experts module"
    with _probe_implementation() as calls:
        out = _main(built.forward(_PROBE))
        ran = [id(module) for module, _ in calls]
        assert sorted(ran) == sorted(id(m) for m in expected)
        assert all(o.abs().max() > 0 for _, o in calls)
    _use(built.model, "eager")
    torch.testing.assert_close(out, built.reference(), atol=ATOL, rtol=RTOL)


# ----- gate facts --------------------------------------------------------------------------------
def _layers(model) -> dict[str, Any]:
    """Decoder layers by name (``...layers.<i>``)."""
    return {n: m for n, m in model.named_modules() if re.fullmatch(r"(.*\.)?layers\.\d+", n)}


def _has(module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _scores(score: str, logits: torch.Tensor, config) -> torch.Tensor:
    from transformers.activations import ACT2FN

    if score.startswith("config:"):
        score = getattr(config, score.split(":", 1)[1])
    if score == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    return ACT2FN[score](logits.float())


def test_gate_facts_hold(family):
    """The catalog's gate facts on the running model: paths, return order, what the experts get,
    and (for the standard score functions) the weights rebuilt from the returned logits."""
    fam = FAMILIES[family]
    g = fam.gate
    model = fam.build(seed=3)
    config = model.config
    layers = _layers(model)
    moe_layers = {n: layer for n, layer in layers.items() if _has(layer, g.experts)}
    assert moe_layers, f"no decoder layer has {g.experts}"
    experts_names = {n for n, _ in model.named_modules()
                     if any(n == f"{ln}.{g.experts}" for ln in moe_layers)}
    assert len(experts_names) == len(moe_layers)
    for name, module in model.named_modules():  # every experts module is where the catalog says
        if module in _experts(model):
            assert any(name in (f"{ln}.{p}" for p in (g.experts, *fam.idle_experts))
                       for ln in layers), name

    seen: dict[str, dict[str, Any]] = {}
    hooks = []
    rng = torch.Generator().manual_seed(4)
    for ln, layer in moe_layers.items():
        gate, experts = layer.get_submodule(g.path), layer.get_submodule(g.experts)
        with torch.no_grad():  # spread the logits: a fresh gate gives near-ties (or zeros)
            for p in gate.parameters():
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=rng) if p.dim() == 1
                        else torch.randn(p.shape, generator=rng) * 0.3)
            if g.bias and _has_tensor(layer, g.bias):  # non-zero: selection != weights matters
                bias = _tensor(layer, g.bias)
                bias.copy_(torch.randn(bias.shape, generator=rng) * 0.1)
        hooks.append(gate.register_forward_hook(
            lambda m, a, out, ln=ln: seen.setdefault(ln, {}).__setitem__("gate", (a, out))))
        hooks.append(experts.register_forward_hook(
            lambda m, a, out, ln=ln: seen.setdefault(ln, {}).__setitem__("experts", a)))
    _use(model, "eager")
    with torch.no_grad():
        model(_built(family).ids)
    for h in hooks:
        h.remove()

    checked = 0
    for ln, layer in moe_layers.items():
        assert "gate" in seen.get(ln, {}), f"{ln}.{g.path} did not run"
        gate_mod = layer.get_submodule(g.path)
        (gate_args, out), exp_args = seen[ln]["gate"], seen[ln]["experts"]
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(g.returns), f"{ln}: gate returned {len(out)} values"
        got = dict(zip(g.returns, out))
        hashed = g.selection == "hash+topk" and "Hash" in type(gate_mod).__name__
        inputs = (*g.inputs, "input_ids") if hashed else g.inputs
        # zaya's first layer has no router state to pass (keyword None); the others pass it
        assert len(gate_args) == 1 + len(inputs) or g.inputs == ("router_states",), (
            f"{ln}: gate called with {len(gate_args)} positional inputs, catalog: {inputs}")
        indices, weights = got["indices"], got["weights"]
        assert not indices.is_floating_point() and weights.is_floating_point()
        num_experts = layer.get_submodule(g.experts).num_experts
        assert torch.equal(exp_args[1], indices) and torch.equal(exp_args[2], weights), (
            f"{ln}: the experts do not get the gate's (indices, weights) unchanged")
        assert indices.shape == weights.shape
        assert int(indices.max()) < num_experts
        pre = got.get("logits", got.get("probs"))
        assert pre.shape[-1] >= num_experts
        if g.score in ("sparsemixer", "logsigmoid+shared") or hashed:
            continue  # family-specific rules, documented in the catalog's notes
        pre = pre.reshape(-1, pre.shape[-1]).float()
        if g.score == "softmax_topk":
            expected = torch.softmax(pre.gather(1, indices), dim=-1)
            scores = None
        else:
            scores = pre if "probs" in got else _scores(g.score, pre, config)
            expected = scores.gather(1, indices)
        normalize = getattr(config, g.normalize) if isinstance(g.normalize, str) else g.normalize
        if normalize:
            expected = expected / expected.sum(-1, keepdim=True)
        if g.scale == "1/top_k":
            expected = expected / indices.shape[-1]
        elif g.scale:
            factor = getattr(gate_mod, g.scale)
            factor = factor[indices] if torch.is_tensor(factor) and factor.numel() > 1 else factor
            expected = expected * factor
        selected = None
        if g.selection in ("topk", "group_topk") and scores is not None:
            # top-k of (scores + bias), within the best topk_group groups for group_topk
            base = (pre if g.bias_on == "logits" else scores).clone()
            if g.bias:
                base = base + _tensor(layer, g.bias).float().reshape(-1)
            if g.selection == "group_topk":
                base = _best_groups_only(base, gate_mod)
            selected = base.topk(indices.shape[-1], dim=-1).indices
        if g.skip_expert:  # the skip class (index num_experts): weight 0, index 0
            assert selected is not None
            skipped = selected == num_experts
            assert skipped.any() and not skipped.all(), "want tokens that skip and that don't"
            expected = scores.gather(1, selected).masked_fill(skipped, 0.0)
            selected = selected.masked_fill(skipped, 0)
        torch.testing.assert_close(weights.float(), expected, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{ln}: weights != catalog rule ({m})")
        if selected is not None:
            assert torch.equal(selected.sort(-1).values, indices.sort(-1).values), (
                f"{ln}: selection is not top-k of the catalog's selection scores")
        checked += 1
    if g.score not in ("sparsemixer", "logsigmoid+shared"):
        assert checked, "no gate was checked"


def _is_buffer(module, path: str) -> bool:
    owner, _, leaf = path.rpartition(".")
    return leaf in dict(module.get_submodule(owner).named_buffers(recurse=False))


def _best_groups_only(scores: torch.Tensor, gate) -> torch.Tensor:
    """``scores`` with the experts outside the ``topk_group`` best of ``n_group`` groups (group
    score: the sum of its top-2) set to -inf, as the DeepSeek-V3-style gates select."""
    groups = getattr(gate, "n_group", None) or getattr(gate, "num_group", None)
    assert groups, f"{type(gate).__name__} has no n_group / num_group"
    tokens, experts = scores.shape
    grouped = scores.view(tokens, groups, experts // groups)
    best = grouped.topk(2, dim=-1).values.sum(-1).topk(gate.topk_group, dim=-1).indices
    keep = torch.zeros(tokens, groups, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, experts)


def _has_tensor(module, path: str) -> bool:
    owner, _, leaf = path.rpartition(".")
    return _has(module, owner) and (
        leaf in dict(module.get_submodule(owner).named_buffers(recurse=False))
        or leaf in dict(module.get_submodule(owner).named_parameters(recurse=False)))


def _tensor(module, path: str) -> torch.Tensor:
    return module.get_buffer(path) if _is_buffer(module, path) else module.get_parameter(path)


def test_bfloat16_gate_dtypes_and_moe_router_matches_grouped_mm(family):
    """In a bfloat16 model (``_from_config(dtype=bfloat16)``, which keeps the family's float32
    modules): the dtypes of the gate's logits and weights are the catalog's, and ``moe_router``
    matches ``grouped_mm`` (whose numerics it follows; eager differs in bfloat16 wherever the
    weights are float32: it accumulates in bfloat16)."""
    fam = FAMILIES[family]
    g = fam.gate
    config = fam.config()
    torch.manual_seed(0)
    model = fam.model_cls()._from_config(config, dtype=torch.bfloat16).eval()
    outs: list[tuple] = []
    hooks = [layer.get_submodule(g.path).register_forward_hook(lambda m, a, o: outs.append(o))
             for layer in _layers(model).values() if _has(layer, g.experts)]
    ids = _built(family).ids
    _use(model, "grouped_mm")
    with torch.no_grad():
        reference = _main(model(ids))
    for h in hooks:
        h.remove()
    assert outs
    for out in outs:
        got = dict(zip(g.returns, out))
        pre = got.get("logits", got.get("probs"))
        assert (pre.dtype == torch.float32) == g.fp32_logits, f"logits are {pre.dtype}"
        weights = got["weights"]
        assert (weights.dtype == torch.float32) == g.weights_fp32, f"weights are {weights.dtype}"
    if _moe_router_missing():
        return
    _use(model, "moe_router")
    with torch.no_grad():
        out = _main(model(ids))
    assert out.dtype == reference.dtype
    torch.testing.assert_close(out, reference)  # bfloat16 tolerances


# ----- (b) generation ----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_generation_matches_eager(family, impl):
    if not FAMILIES[family].generates:
        pytest.skip(f"{FAMILIES[family].model_class} has no language-model head")
    _need(impl)
    built = _built(family)
    if "generate" not in built.cache:
        built.cache["generate"] = built.generate("eager")
    tokens = built.generate(impl)
    assert tokens.shape == (1, 9)
    assert torch.equal(tokens, built.cache["generate"])


# ----- (c) save with moe_router (or grouped_mm), load with stock transformers --------------------
@pytest.mark.parametrize("impl", ["grouped_mm", "moe_router"])
def test_saved_with_impl_loads_in_stock_transformers(family, impl, tmp_path):
    """Saved with ``impl`` active (``moe_router`` through ``use_moe_router_experts``), the
    checkpoint loads in stock transformers (``eager``) with the same weights and outputs."""
    _need(impl)
    built = _built(family)
    model = built.model
    if impl == "moe_router":
        from moe_router.torch import use_moe_router_experts

        assert use_moe_router_experts(model) == len(_experts(model))
    else:
        _use(model, impl)
    with torch.no_grad():
        active = _main(model(built.ids))
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert f'"{impl}"' not in saved, f"experts_implementation {impl!r} leaked into the config"
    json.loads(saved)
    loaded = type(model).from_pretrained(tmp_path, experts_implementation="eager").eval()
    assert all(m.config._experts_implementation == "eager" for m in _experts(loaded))
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), f"{key} changed by save / load"
    with torch.no_grad():
        out = _main(loaded(built.ids))
    torch.testing.assert_close(out, built.reference(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(active, built.reference(), atol=ATOL, rtol=RTOL)
    _use(model, "eager")


# ----- (d) initialisation ------------------------------------------------------------------------
_RANDOM_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                 "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _seeded_init():
    """Make every random init call deterministic in (function, shape, arguments) rather than in
    the order of the calls, so ``__init__`` and the meta-device path can be compared exactly
    (the idea of transformers' ``seeded_weight_init``)."""
    import torch.nn.init as torch_init
    import transformers.initialization as hf_init

    saved = []
    for module in (torch_init, hf_init):
        for name in _RANDOM_INITS:
            original = getattr(module, name, None)
            if original is None:
                continue

            def seeded(tensor, *args, _original=original, _name=name, **kwargs):
                key = f"{_name}|{tuple(tensor.shape)}|{args}|{sorted(kwargs.items())}"
                torch.manual_seed(zlib.crc32(key.encode()))
                return _original(tensor, *args, **kwargs)

            saved.append((module, name, original))
            setattr(module, name, seeded)
    try:
        yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


def _sentinel(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-12345)


def _is_sentinel(t: torch.Tensor) -> bool:
    if t.is_floating_point() or t.is_complex():
        return bool(torch.isnan(t).any())
    return t.dtype != torch.bool and bool((t == -12345).any())


def test_init_path_initialises_every_tensor_also_from_meta(family, request):
    """Built on the meta device, moved with ``to_empty`` and filled with a sentinel, the model's
    ``init_weights`` rewrites every parameter and buffer, exactly as ``__init__`` would."""
    _upstream(request, family, "init")
    fam = FAMILIES[family]
    cls = fam.model_cls()
    with _seeded_init():
        torch.manual_seed(0)
        reference = cls(fam.config())
    with torch.device("meta"):
        model = cls(fam.config())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            _sentinel(t)
    with _seeded_init():
        model.init_weights()
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    untouched = sorted(n for n, t in tensors.items() if _is_sentinel(t))
    assert not untouched, f"not initialised by init_weights: {untouched}"
    ref = {**dict(reference.named_parameters(remove_duplicate=False)),
           **dict(reference.named_buffers(remove_duplicate=False))}
    assert sorted(ref) == sorted(tensors)
    different = sorted(n for n, t in tensors.items() if not torch.equal(t, ref[n]))
    assert not different, f"init_weights after meta != __init__ for: {different}"
    with torch.no_grad():
        out = _main(model.eval()(_built(family).ids))
    assert torch.isfinite(out).all()


# ----- (e) parallel plans ------------------------------------------------------------------------
def _plan_misses(plan: dict, names: set[str], optional: tuple[str, ...]) -> list[str]:
    misses = []
    for key in plan:
        if key in optional or key.split(".", 1)[-1] in optional:  # "model.<optional key>" too
            continue
        pattern = re.compile(re.escape(key).replace(r"\*", r"\d+"))
        if not any(pattern.fullmatch(n) for n in names):
            misses.append(key)
    return misses


def test_parallel_plans_name_existing_parameters(family, request):
    _upstream(request, family, "tp_plan")
    fam = FAMILIES[family]
    model = _built(family).model
    base = model.base_model
    base_names = {n for n, _ in base.named_modules()} | {n for n, _ in base.named_parameters()}
    all_names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    keys = []
    for attr in ("base_model_tp_plan", "base_model_ep_plan"):
        plan = getattr(model.config, attr, None) or {}
        misses = _plan_misses(plan, base_names, fam.tp_plan_optional)
        assert not misses, f"config.{attr} names nothing in {type(base).__name__}: {misses}"
        keys += plan
    top = getattr(model, "_tp_plan", None) or {}
    misses = _plan_misses(top, all_names, fam.tp_plan_optional)
    assert not misses, f"{type(model).__name__}._tp_plan names nothing: {misses}"
    experts = f"layers.*.{fam.gate.experts}"
    assert any(k == experts or k.startswith(experts + ".") for k in keys), \
        f"neither the tensor- nor the expert-parallel plan covers {experts}"


# ----- (f) training ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_training_loss_and_gradients_match_eager(family, impl):
    _need(impl)
    built = _built(family)
    if "train" not in built.cache:
        built.cache["train"] = built.loss_and_grads("eager")
    ref_loss, ref_grads = built.cache["train"]
    loss, grads = built.loss_and_grads(impl)
    _use(built.model, "eager")
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    assert sorted(grads) == sorted(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    experts = [n for n in grads if re.search(r"\.experts\.", n)]
    assert experts and any(grads[n].abs().max() > 0 for n in experts), \
        "no gradient reaches the experts"
    gate = FAMILIES[family].gate.path
    assert any(f".{gate}." in n and grads[n].abs().max() > 0 for n in grads), \
        "no gradient reaches the gate"


def test_router_logits_and_aux_loss(family, request):
    _upstream(request, family, "router_logits")
    fam = FAMILIES[family]
    built = _built(family)
    model = built.model
    _use(model, "eager")
    labels = {}
    if fam.has_labels:
        labels["labels"] = built.ids if fam.generates else built.ids % 2
    with torch.no_grad():
        plain = model(built.ids, **labels)
        out = model(built.ids, output_router_logits=True, **labels)
    torch.testing.assert_close(_main(out), _main(plain), atol=ATOL, rtol=RTOL)
    router_logits = out.router_logits
    num_gates = sum(_has(layer, fam.gate.path) for layer in _layers(model).values())
    assert router_logits is not None and len(router_logits) >= 1
    assert len(router_logits) <= num_gates
    tokens = built.ids.numel()
    for logits in router_logits:
        assert logits.shape[0] == tokens and logits.shape[-1] >= 8
    aux = getattr(out, "aux_loss", None)
    if not fam.aux_loss:
        assert aux is None, "the catalog says no aux loss"
        return
    assert aux is not None and torch.isfinite(aux) and aux > 0
    coef = model.config.router_aux_loss_coef
    torch.testing.assert_close(out.loss, plain.loss + coef * aux, atol=1e-6, rtol=1e-6)


# ----- transformers issues found on the way ------------------------------------------------------
@pytest.mark.xfail(raises=IndexError, strict=True,
                   reason=f"transformers: deepseek_v4 {UPSTREAM_ISSUES['deepseek_v4']}")
def test_upstream_deepseek_v4_router_logits_with_only_hash_layers():
    model = FAMILIES["deepseek_v4"].build(mlp_layer_types=["hash_moe", "hash_moe"])
    with torch.no_grad():
        out = model(_built("deepseek_v4").ids, output_router_logits=True)
    assert out.router_logits == ()
