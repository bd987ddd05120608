"""Training and evaluation of one arm: the language-model loss plus every layer's aux loss,
routing statistics by layer over training, and a validation pass that keeps per-byte values."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import einops
import numpy as np
import torch
import torch.nn.functional as F

from .model import NUM_EXPERTS, RELU_L1_GROWTH, RELU_L1_START, Arm, TinyMoELM

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by every arm of a run."""

    steps: int
    batch: int
    lr: float = 2e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    clip: float = 1.0
    evals: int = 4            # validation passes during training (on curve_windows windows)
    curve_windows: int = 32
    log_points: int = 50      # points of the k-over-training curve

    def describe(self) -> dict[str, Any]:
        """JSON-ready, with the optimiser named."""
        return {**asdict(self), "optimizer": "AdamW(betas=(0.9, 0.95))",
                "schedule": "linear warmup, cosine decay to 10%"}


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup then cosine decay to 10% of ``s.lr``."""
    warm = max(1, int(s.warmup_frac * s.steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    t = (step - warm) / max(1, s.steps - warm)
    return s.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy in nats, ``targets``' shape."""
    flat = F.cross_entropy(einops.rearrange(logits, "b s v -> (b s) v"),
                           einops.rearrange(targets, "b s -> (b s)"), reduction="none")
    return einops.rearrange(flat, "(b s) -> b s", b=targets.shape[0])


class ReluL1:
    """ReMoE's adaptive L1 on the ReLU gates: captures each router's logits (forward hook) and
    grows / shrinks its coefficient by ``RELU_L1_GROWTH`` toward the target mean k."""

    def __init__(self, model: TinyMoELM, target: float) -> None:
        self.target, self.coef, self.logits = target, RELU_L1_START, []
        self.hooks = [m.router.register_forward_hook(self._keep) for m in model.moe]

    def _keep(self, module: Any, args: Any, out: torch.Tensor) -> None:
        if module.training:
            self.logits.append(out)

    def loss(self) -> torch.Tensor:
        """coef x mean over layers and tokens of sum_e relu(logit)."""
        l1 = torch.stack([F.relu(z[..., :NUM_EXPERTS]).sum(-1).mean() for z in self.logits])
        self.logits = []
        return self.coef * l1.mean()

    def update(self, mean_k: float) -> None:
        """One controller step from this step's mean k."""
        self.coef *= RELU_L1_GROWTH ** float(np.sign(mean_k - self.target))

    def close(self) -> None:
        """Remove the hooks."""
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def evaluate(model: TinyMoELM, windows: np.ndarray, batch: int = 32,
             keep_tokens: bool = False) -> dict[str, Any]:
    """Validation pass in eval mode: bits per byte, per-layer mean k, k histogram, max/mean
    load, z-loss and dropped slots; with ``keep_tokens`` also per-position CE (nats) and k
    (``(L, N, S)``) as arrays under ``"tokens"``."""
    model.eval()
    layers = model.moe
    L = len(layers)
    ce_parts, k_parts = [], []
    counts = [np.zeros(NUM_EXPERTS) for _ in range(L)]
    hist = [np.zeros(layers[0].config.router.max_slots + 1) for _ in range(L)]
    z_sum, dropped = np.zeros(L), 0
    for start in range(0, len(windows), batch):
        chunk = torch.from_numpy(windows[start:start + batch])
        ce = lm_loss(model(chunk[:, :-1]), chunk[:, 1:])
        ce_parts.append(ce.numpy())
        ks = []
        for i, layer in enumerate(layers):
            plan = layer.last_plan
            ks.append(plan.num_experts_per_token.reshape(ce.shape).numpy())
            counts[i] += plan.expert_counts.numpy()
            hist[i] += plan.stats.k_histogram.numpy()
            z_sum[i] += float(plan.losses.z_loss) * ce.shape[0]
            dropped += int(plan.num_dropped)
        k_parts.append(np.stack(ks))
    ce_NS, k_LNS = np.concatenate(ce_parts), np.concatenate(k_parts, axis=1)
    out: dict[str, Any] = {
        "val_bpb": float(ce_NS.mean() / LN2),
        "k_by_layer": [float(k) for k in k_LNS.mean(axis=(1, 2))],
        "k_hist_by_layer": [[int(c) for c in h] for h in hist],
        "load_max_over_mean_by_layer": [float(c.max() / max(c.mean(), 1e-9)) for c in counts],
        "z_loss_by_layer": [float(z / len(windows)) for z in z_sum],
        "dropped": dropped,
    }
    out["k_mean"] = float(np.mean(out["k_by_layer"]))
    if keep_tokens:
        out["tokens"] = {"ce": ce_NS, "k": k_LNS}
    return out


@torch.no_grad()
def bias_effect(model: TinyMoELM, windows: np.ndarray) -> dict[str, Any]:
    """Share of (layer, token) routings that change when the trained expert bias is zeroed,
    and the bias's spread: does the aux-free bias steer this strategy at all?"""
    model.eval()
    x = torch.from_numpy(windows[:, :-1])
    model(x)
    with_bias = [m.last_plan.expert_indices.clone() for m in model.moe]
    saved = [m.router.expert_bias.clone() for m in model.moe]
    for m in model.moe:
        m.router.expert_bias.zero_()
    model(x)
    changed = [float((m.last_plan.expert_indices != w).any(-1).float().mean())
               for m, w in zip(model.moe, with_bias)]
    for m, b in zip(model.moe, saved):
        m.router.expert_bias.copy_(b)
    return {"routing_changed_by_layer": changed,
            "bias_range_by_layer": [float(b.max() - b.min()) for b in saved]}


Logger = Callable[[int, dict[str, float]], None]


def train_arm(model: TinyMoELM, arm: Arm, batches: Iterable[np.ndarray], s: TrainSettings,
              curve_windows: np.ndarray, log: Logger | None = None) -> dict[str, Any]:
    """Train in place; returns the curves (train k by layer, train loss, validation bpb and k
    at ``s.evals`` points), the mean training k and the timings."""
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95),
                            weight_decay=s.weight_decay)
    relu = ReluL1(model, arm.relu_k_target) if arm.relu_k_target is not None else None
    bias_layers = [m for m in model.moe if m.config.router.use_expert_bias]
    every = max(1, s.steps // s.log_points)
    eval_at = {round(s.steps * (i + 1) / (s.evals + 1)) for i in range(s.evals)}
    curve: dict[str, list[Any]] = {"step": [], "k_by_layer": [], "train_bpb": []}
    val_curve: dict[str, list[Any]] = {"step": [], "val_bpb": [], "k_mean": []}
    k_acc, loss_acc, n_acc, k_total = np.zeros(len(model.moe)), 0.0, 0, 0.0
    train_s = eval_s = cpu_s = 0.0
    for step, batch_np in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        batch = torch.from_numpy(batch_np)
        ce = lm_loss(model(batch[:, :-1]), batch[:, 1:]).mean()
        loss = ce + sum(m.aux_loss for m in model.moe)
        if relu is not None:
            loss = loss + relu.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        for m in bias_layers:
            m.update_expert_bias()
        ks = np.array([float(m.last_plan.stats.mean_experts) for m in model.moe])
        if relu is not None:
            relu.update(float(ks.mean()))
        k_acc, loss_acc, n_acc, k_total = k_acc + ks, loss_acc + float(ce.detach()), n_acc + 1, \
            k_total + float(ks.mean())
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        if (step + 1) % every == 0 or step + 1 == s.steps:
            curve["step"].append(step + 1)
            curve["k_by_layer"].append([float(k) for k in k_acc / n_acc])
            curve["train_bpb"].append(loss_acc / n_acc / LN2)
            if log is not None:
                log(step + 1, {"bpb": loss_acc / n_acc / LN2, "k": float(k_acc.mean() / n_acc),
                               "s/step": train_s / (step + 1)})
            k_acc, loss_acc, n_acc = np.zeros(len(model.moe)), 0.0, 0
        if step + 1 in eval_at:
            t1 = time.perf_counter()
            ev = evaluate(model, curve_windows)
            val_curve["step"].append(step + 1)
            val_curve["val_bpb"].append(ev["val_bpb"])
            val_curve["k_mean"].append(ev["k_mean"])
            eval_s += time.perf_counter() - t1
    if relu is not None:
        relu.close()
    steps = max(1, len(curve["step"]) and curve["step"][-1])
    out: dict[str, Any] = {"curve": curve, "val_curve": val_curve,
                           "train_k_mean": k_total / steps, "train_s": train_s,
                           "curve_eval_s": eval_s, "s_per_step": train_s / steps,
                           "cpu_s_per_step": cpu_s / steps}
    if relu is not None:
        out["relu_l1_coef_final"] = relu.coef
    states = [m.router_state for m in model.moe]
    if arm.router.get("strategy") == "top_p":
        out["final_top_p_by_layer"] = [float(st.top_p) for st in states]
    return out
