"""``moe-router profile``: time per phase of the MoE layer step (router GEMM, selection, permute,
expert GEMMs, combine, shared expert) for our layer or for a tiny Hugging Face model whose MoE
blocks were replaced (``--hf-model mixtral``).

Methods:

- ``profiler`` (torch, the default there): ``torch.profiler`` over ``--steps`` calls; the layer
  step's phases run in ``record_function`` scopes named ``moe_router/<phase>``
  (``Backend.scope``), whose inclusive CPU time (and CUDA time on a GPU) is added up per phase.
  ``other`` is the rest of the layer (observers, reshapes, Python).
- ``wall`` (every backend; the only one for numpy, jax, tensorflow): the phases called one after
  the other, eagerly, with a sync after each (``block_until_ready`` / a host copy); ``jit`` and
  ``tf.function`` fuse them, so read it as where eager time goes.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any

from .common import CLIError, non_negative_int, positive_int, quiet_frameworks

PHASES = ("router_gemm", "select", "permute", "experts", "combine", "shared")
BACKENDS = ("torch", "numpy", "jax", "tensorflow")
#: sizes of ``--hf-model`` configs, for the keys the family's config class accepts
HF_TINY: dict[str, Any] = dict(
    vocab_size=1000, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    n_group=1, topk_group=1, first_k_dense_replace=0, n_shared_experts=1,
    q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    num_nextn_predict_layers=0)


# ----- the torch profiler --------------------------------------------------------------------
def _aggregate(prof: Any, steps: int, labels: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per label: inclusive CPU ms per step, self CPU ms, device ms and calls per step."""
    out: dict[str, dict[str, float]] = {}
    for event in prof.key_averages():
        name = labels.get(event.key)
        if name is None:
            continue
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        out[name] = {"ms": event.cpu_time_total / 1e3 / steps,
                     "self_ms": event.self_cpu_time_total / 1e3 / steps,
                     "device_ms": float(device_us or 0.0) / 1e3 / steps,
                     "calls": event.count / steps}
    return out


def _timed_forward(module: Any, label: str) -> None:
    """Wrap ``module.forward`` (instance attribute) in ``record_function(label)``."""
    import torch

    forward = module.forward

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return forward(*args, **kwargs)

    module.forward = wrapped


def _torch_profile(call: Any, steps: int, warmup: int, device: Any) -> Any:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(warmup):
            call()
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("moe_router/model"):
                    call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    return prof


def _torch_layer(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    import torch

    from moe_router.layer.experts import dispatch_info, resolve_kernel
    from moe_router.torch import MoE, TorchBackend

    device, dtype = _torch_device_dtype(args)
    layer = MoE(config, seed=args.seed).to(device, dtype).eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, args.tokens, config.d_model, generator=gen).to(device, dtype)
    b = TorchBackend()
    with torch.inference_mode():
        K = layer(x, return_plan=True)[1].expert_indices.shape[1]
    kernel = resolve_kernel(b, config.dispatch, dispatch_info(b, config, x[0], K), x[0])
    _timed_forward(layer, "moe_router/layer")
    prof = _torch_profile(lambda: layer(x), args.steps, args.warmup, device)
    return {"kernel": kernel, "layers": 1, **_profile_phases(prof, args.steps)}


def _profile_phases(prof: Any, steps: int) -> dict[str, Any]:
    from moe_router.layer.experts import SCOPES

    labels = {label: phase for phase, label in SCOPES.items()}
    labels.update({"moe_router/layer": "layer", "moe_router/model": "model"})
    found = _aggregate(prof, steps, labels)
    zero = {"ms": 0.0, "self_ms": 0.0, "device_ms": 0.0, "calls": 0.0}
    phases = {phase: found.get(phase, dict(zero)) for phase in PHASES}
    layer = found.get("layer", zero)
    return {"phases": phases, "layer_ms": layer["ms"], "layer_device_ms": layer["device_ms"],
            "model_ms": found.get("model", zero)["ms"]}


def _hf_model(args: argparse.Namespace) -> dict[str, Any]:
    if importlib.util.find_spec("transformers") is None:
        raise CLIError("--hf-model needs transformers: pip install 'moe-router[torch]' "
                       "transformers")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moe_router.torch import MoE, replace_moe_blocks
    from moe_router_backends.torch.hf import SUPPORTED_BLOCKS

    family = args.hf_model
    if family not in SUPPORTED_BLOCKS.values():
        raise CLIError(f"--hf-model {family!r}: expected one of "
                       f"{', '.join(sorted(SUPPORTED_BLOCKS.values()))}")
    cls = CONFIG_MAPPING[family]
    sizes = dict(HF_TINY, hidden_size=args.d_model, intermediate_size=args.d_ff,
                 moe_intermediate_size=args.d_ff, shared_expert_intermediate_size=args.d_ff,
                 num_local_experts=args.experts, num_experts=args.experts,
                 n_routed_experts=args.experts, num_experts_per_tok=args.k)
    accepted = inspect.signature(cls.__init__).parameters
    hf_config = cls(**{key: value for key, value in sizes.items() if key in accepted})
    device, dtype = _torch_device_dtype(args)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(hf_config).eval()
    overrides = {} if args.strategy is None else {"strategy": args.strategy}
    replaced = replace_moe_blocks(model, **overrides)
    model = model.to(device, dtype)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for layer in layers:
        if args.dispatch != "auto":
            layer.config = layer.config.replace(dispatch=args.dispatch)
        _timed_forward(layer, "moe_router/layer")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, hf_config.vocab_size, (1, args.tokens), generator=gen).to(device)
    prof = _torch_profile(lambda: model(input_ids=ids), args.steps, args.warmup, device)
    return {"model": type(model).__name__, "family": family, "layers": replaced,
            **_profile_phases(prof, args.steps)}


def _torch_device_dtype(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    device = torch.device(args.device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device available")
    return device, getattr(torch, args.dtype)


# ----- wall clock, every backend -------------------------------------------------------------
def _wall(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    from moe_router.layer.experts import (
        dispatch_info,
        expert_weights,
        permute,
        resolve_kernel,
        shared_expert,
        unpermute,
    )
    from moe_router.layer.state import initial_state
    from moe_router.layer.step import layer_step, stages_for
    from moe_router.layer.tuning import array_like, sync
    from moe_router.registry import default_registry
    from moe_router.weights import init_weights

    registry = default_registry()
    b = registry.backend(args.backend)
    like = array_like(b, args.dtype, args.device)
    import numpy as np

    rng = np.random.default_rng(args.seed)
    x_TD = b.cast_like(b.asarray(rng.standard_normal((args.tokens, config.d_model))
                                 .astype(np.float32), like=like), like)
    params = {n: b.asarray(v, like=like) for n, v in init_weights(config, args.seed).items()}
    stages = stages_for(b)
    state = initial_state(b, config, like=x_TD)
    times: dict[str, list[float]] = {phase: [] for phase in (*PHASES, "layer")}
    kernel = None
    for step in range(args.warmup + args.steps):
        t = [time.perf_counter()]
        logits_TE = stages.router_logits(x_TD, params, config)
        sync(b, logits_TE)
        t.append(time.perf_counter())
        fast = stages.fast_select(logits_TE, config.router, {"hidden_TD": x_TD})
        if fast is None:
            plan = stages.route(logits_TE, config.router, hidden_TD=x_TD)
            fast = (plan.expert_indices, plan.expert_weights)
        ids_TK, gates_TK = fast
        sync(b, gates_TK)
        t.append(time.perf_counter())
        info = dispatch_info(b, config, x_TD, b.shape(ids_TK)[1])
        kernel = resolve_kernel(b, config.dispatch, info, x_TD)
        spec, fn = registry.kernel_spec(kernel), registry.kernel(kernel)
        w = expert_weights(b, params, x_TD)
        if spec.kind == "tokens":
            t.append(t[-1])
            y_TD = fn(b, x_TD, ids_TK, gates_TK, w, config.activation, info)
            sync(b, y_TD)
            t += [time.perf_counter()] * 2
        else:
            x_SD, perm = permute(b, x_TD, ids_TK, config.num_experts)
            sync(b, x_SD)
            t.append(time.perf_counter())
            out_SD = fn(b, x_SD, perm, w, config.activation, info)
            sync(b, out_SD)
            t.append(time.perf_counter())
            sync(b, unpermute(b, out_SD, perm, gates_TK))
            t.append(time.perf_counter())
        if config.has_shared:
            sync(b, shared_expert(b, x_TD, params, config))
        t.append(time.perf_counter() if config.has_shared else t[-1])
        y = layer_step(b, params, state, x_TD, config, need_plan=False).y
        sync(b, y)
        t.append(time.perf_counter())
        if step >= args.warmup:
            for i, phase in enumerate((*PHASES, "layer")):
                times[phase].append(t[i + 1] - t[i])
    med = {phase: statistics.median(values) * 1e3 for phase, values in times.items()}
    phases = {phase: {"ms": med[phase], "self_ms": med[phase], "device_ms": 0.0,
                      "calls": 1.0 if med[phase] > 0 else 0.0} for phase in PHASES}
    return {"kernel": kernel, "layers": 1, "phases": phases, "layer_ms": med["layer"],
            "layer_device_ms": 0.0, "model_ms": 0.0}


# ----- the command ---------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> Any:
    from moe_router.config import MoEConfig, RouterConfig

    router = RouterConfig(num_experts=args.experts, k=args.k, strategy=args.strategy or "top_k")
    return MoEConfig(d_model=args.d_model, d_ff=args.d_ff, router=router,
                     activation=args.activation, dispatch=args.dispatch,
                     num_shared_experts=args.shared_experts)


def _check(args: argparse.Namespace) -> None:
    if importlib.util.find_spec(args.backend) is None:
        raise CLIError(f"--backend {args.backend}: {args.backend} is not installed")
    if args.method is None:
        args.method = "profiler" if args.backend == "torch" else "wall"
    if args.method == "profiler" and args.backend != "torch":
        raise CLIError(f"--method profiler: only for --backend torch (use --method wall for "
                       f"{args.backend})")
    if args.hf_model and (args.backend != "torch" or args.method != "profiler"):
        raise CLIError("--hf-model: runs with --backend torch --method profiler only")
    if args.threads and args.backend != "torch":
        raise CLIError("--threads: only the torch backend sets its threads at run time")
    if args.device not in (None, "cpu") and args.backend != "torch":
        raise CLIError(f"--device {args.device}: only for --backend torch")
    if args.k > args.experts:
        raise CLIError(f"--k {args.k}: must be <= --experts {args.experts}")
    defaults = (64, 128, 64) if args.hf_model else (512, 1024, 256)
    for name, default in zip(("d_model", "d_ff", "tokens"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)


def _report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    phases = result["phases"]
    total = sum(p["ms"] for p in phases.values())
    base = result["layer_ms"] if args.method == "profiler" else total
    rows = {phase: {**p, "share": p["ms"] / base if base > 0 else 0.0}
            for phase, p in phases.items()}
    if args.method == "profiler":
        other = max(0.0, result["layer_ms"] - total)
        rows["other"] = {"ms": other, "self_ms": other, "device_ms": 0.0, "calls": 0.0,
                         "share": other / base if base > 0 else 0.0}
    return {**result, "phases": rows, "phase_sum_ms": total}


def _print(report: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    what = (f"{report['model']} ({report['layers']} MoE layers replaced)"
            if args.hf_model else f"{args.backend} layer, dispatch {report['kernel']}")
    base = "of the MoE layers" if args.method == "profiler" else "of the phase sum"
    table = Table(title=f"{what}: d={args.d_model} f={args.d_ff} E={args.experts} k={args.k} "
                        f"T={args.tokens} {args.dtype}, {args.method} ms per step "
                        f"({args.steps} steps)")
    device = any(p["device_ms"] > 0 for p in report["phases"].values())
    extra = (["self ms"] if args.method == "profiler" else []) + (["device ms"] if device else [])
    for column in ("phase", "ms", f"share {base}", *extra):
        table.add_column(column, justify="right" if column != "phase" else "left")
    for phase, p in report["phases"].items():
        cells = {"self ms": f"{p['self_ms']:.4f}", "device ms": f"{p['device_ms']:.4f}"}
        table.add_row(phase, f"{p['ms']:.4f}", f"{p['share']:.1%}",
                      *(cells[column] for column in extra))
    console = Console(width=max(100, Console().width))
    console.print(table)
    layer = f"MoE layers {report['layer_ms']:.4f} ms per step"
    if args.hf_model:
        layer += f", whole model {report['model_ms']:.4f} ms"
    elif args.method == "wall":
        layer += " (the whole step, no syncs between phases)"
    console.print(layer)


def _cmd_profile(args: argparse.Namespace, rest: list[str]) -> int:
    quiet_frameworks()
    _check(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.hf_model:
        result = _hf_model(args)
    else:
        config = _config(args)
        result = (_torch_layer(args, config) if args.method == "profiler"
                  else _wall(args, config))
    report = _report(result, args)
    report["settings"] = {k: v for k, v in vars(args).items()
                          if k not in ("handler", "passthrough", "command")}
    _print(report, args)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        except OSError as err:
            raise CLIError(f"--json {args.json}: {err.strerror or err}") from None
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("profile", help="time per phase of the MoE layer (router GEMM, select, "
                                       "permute, experts, combine)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--method", choices=("profiler", "wall"), default=None,
                   help="default: profiler on torch, wall elsewhere")
    p.add_argument("--hf-model", metavar="FAMILY", default=None,
                   help="a tiny transformers model of this family (mixtral, qwen2_moe, "
                        "qwen3_moe, olmoe, deepseek_v3) with its MoE blocks replaced")
    p.add_argument("--d-model", type=positive_int, default=None,
                   help="default 512 (64 with --hf-model)")
    p.add_argument("--d-ff", type=positive_int, default=None,
                   help="default 1024 (128 with --hf-model)")
    p.add_argument("--experts", type=positive_int, default=8)
    p.add_argument("--k", type=positive_int, default=2)
    p.add_argument("--tokens", type=positive_int, default=None,
                   help="default 256 (64 with --hf-model)")
    p.add_argument("--strategy", default=None, help="routing strategy (default top_k; with "
                                                    "--hf-model: the family's own)")
    p.add_argument("--dispatch", default="auto", help="expert-compute kernel (default auto)")
    p.add_argument("--activation", choices=("swiglu", "geglu", "gelu", "relu", "silu"),
                   default="swiglu")
    p.add_argument("--shared-experts", type=non_negative_int, default=0)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                   default="float32")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON")
    p.set_defaults(handler=_cmd_profile, passthrough=False)
