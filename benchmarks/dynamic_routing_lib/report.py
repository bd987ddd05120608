"""The report step: ``docs/dynamic-routing.md`` and the PNG plots, generated from the JSON alone
(so the page's numbers are the JSON's; ``tests/test_dynamic_routing_smoke.py`` regenerates the
page and compares)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .analysis import excess_over_frontier, half_range, mean_over_runs, static_frontier
from .data import CLASSES

PLOTS = {"k_over_training": "mean experts per token over training",
         "pareto": "validation loss against expert FLOPs",
         "switch": "inference-time switch of the trained top-2 model",
         "synthetic": "mean k by token class (synthetic task)"}


def plot_path(out: Path, name: str) -> Path:
    """Where plot ``name`` goes: ``OUT/dynamic_routing_<name>.png``."""
    return out / f"dynamic_routing_{name}.png"


def _pm(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f" ± {value:.{digits}f}"


def arm_row(arm: Mapping[str, Any]) -> dict[str, Any]:
    """An arm's numbers over its seeds: means and the half range (± of two seeds)."""
    runs = arm["runs"]
    layers = len(runs[0]["k_by_layer"])
    return {"seeds": [r["seed"] for r in runs],
            "bpb": mean_over_runs(runs, "val_bpb"), "bpb_pm": half_range(runs, "val_bpb"),
            "k": mean_over_runs(runs, "k_mean"), "k_pm": half_range(runs, "k_mean"),
            "flops": mean_over_runs(runs, "flops_rel_top2"),
            "train_k": mean_over_runs(runs, "train_k_mean"),
            "load": max(max(r["load_max_over_mean_by_layer"]) for r in runs),
            "z": sum(sum(r["z_loss_by_layer"]) / layers for r in runs) / len(runs),
            "dropped": sum(r["dropped"] for r in runs),
            "wall": sum(r["wall_s"] for r in runs) / len(runs)}


def _compare(data: Mapping[str, Any], name: str) -> str | None:
    """One plain sentence: the arm's FLOPs and bpb against top-2, with the seed spread."""
    arms = data["arms"]
    if name not in arms or "top2" not in arms:
        return None
    a, t = arm_row(arms[name]), arm_row(arms["top2"])
    saved = (1.0 - a["flops"] / t["flops"]) * 100.0
    delta = a["bpb"] - t["bpb"]
    spread = max(v for v in (a["bpb_pm"], t["bpb_pm"], 0.0) if v is not None)
    flops = f"{abs(saved):.1f}% {'fewer' if saved >= 0 else 'more'} expert FLOPs than top-2"
    quality = f"{'+' if delta >= 0 else '-'}{abs(delta):.3f} bits/byte"
    if abs(delta) <= spread:
        verdict = "within the run-to-run spread, so equal quality at this scale"
    elif delta > 0:
        verdict = "worse than top-2 by more than the run-to-run spread"
    else:
        verdict = "better than top-2 by more than the run-to-run spread"
    seeds = ", ".join(str(s) for s in a["seeds"])
    return (f"**{arms[name]['label']}** used {flops} at {quality} ({verdict}; seeds {seeds}; "
            f"half range over seeds: top-2 ±{t['bpb_pm'] or 0.0:.3f}, this arm "
            f"±{a['bpb_pm'] or 0.0:.3f} bits/byte).")


def conclusions(data: Mapping[str, Any]) -> list[str]:
    """The page's plain conclusions, each computed from the JSON."""
    arms, out = data["arms"], []
    for name in dict.fromkeys([data.get("headline"), data.get("best_dynamic")]):
        if name and (line := _compare(data, name)):
            out.append(line)
    seed = data["meta"]["seeds"][0]
    if "top1" in arms and "top2" in arms:
        one, two = (next(r for r in arms[n]["runs"] if r["seed"] == seed) for n in ("top1",
                                                                                   "top2"))
        delta = one["val_bpb"] - two["val_bpb"]
        out.append(f"Static baselines (seed {seed}): top-1 reached {one['val_bpb']:.3f} "
                   f"bits/byte with {one['flops_rel_top2']:.2f}x top-2's expert FLOPs, top-2 "
                   f"{two['val_bpb']:.3f}: one expert per token was "
                   f"{'better' if delta < 0 else 'worse'} by {abs(delta):.3f} bits/byte at this "
                   f"scale, so every saving against top-2 must also be read against top-1.")
    if static_frontier(arms, seed) is not None:
        dyn = [n for n, a in arms.items() if a["dynamic"]]
        excess = {n: excess_over_frontier(arms, n, seed) for n in dyn}
        better = [n for n in dyn if excess[n] < 0]
        out.append(f"Against the straight line between trained top-1 and top-2 (the cost / "
                   f"quality a static mix of k=1 and k=2 would give; seed {seed}, every arm "
                   f"with the same initialisation and data order), {len(better)} of "
                   f"{len(dyn)} dynamic arms lie below the line (better): "
                   + (", ".join(f"{arms[n]['label']} ({excess[n]:+.3f} bits/byte)"
                                for n in better) or "none") + ".")
    switch = data.get("inference_switch")
    if switch:
        pts = [p for p in switch["points"] if p["family"] != "top-k"]
        near = min(pts, key=lambda p: abs(p["k_mean"] - 1.7))
        base = next(p for p in switch["points"] if p["family"] == "top-k" and p["value"] == 2)
        saved = (1 - near["k_mean"] / 2) * 100
        out.append(f"Switching the trained top-2 model to {near['family']} {near['param']}="
                   f"{near['value']} without retraining (the sweep point closest to k=1.7) "
                   f"gives mean k {near['k_mean']:.2f} ({abs(saved):.1f}% "
                   f"{'fewer' if saved >= 0 else 'more'} expert FLOPs) at "
                   f"{near['val_bpb'] - base['val_bpb']:+.3f} bits/byte against the same "
                   f"model routed top-2.")
    out += _variation(arms)
    syn = data.get("synthetic", {}).get("arms", {})
    dyn_syn = {n: s for n, s in syn.items() if s["dynamic"]}
    if dyn_syn:
        more = [n for n, s in dyn_syn.items() if s["classes"]["arith_minus_copy"]["ci"][0] > 0]
        fewer = [n for n, s in dyn_syn.items() if s["classes"]["arith_minus_copy"]["ci"][1] < 0]
        out.append(f"Harder tokens: on the synthetic task, {len(more)} of {len(dyn_syn)} "
                   f"dynamic arms gave arithmetic tokens significantly more experts than copy "
                   f"tokens (95% bootstrap interval above 0), {len(fewer)} significantly fewer.")
    corr = {n: a["runs"][0]["loss_k_corr"]["spearman"] for n, a in arms.items()
            if (a["runs"][0].get("loss_k_corr") or {}).get("spearman") is not None}
    if corr:
        span = f"is {next(iter(corr.values())):+.3f} for the one arm" if len(corr) == 1 else \
            (f"ranges from {min(corr.values()):+.3f} to {max(corr.values()):+.3f} over the "
             f"{len(corr)} arms")
        out.append(f"Text: the Spearman correlation between a byte's validation loss and its "
                   f"k {span} whose k varies (positive = harder bytes get more experts).")
    for name, arm in arms.items():
        effect = arm["runs"][0].get("bias_effect")
        if effect and max(effect["routing_changed_by_layer"]) == 0.0:
            out.append(f"{arm['label']}: zeroing the trained bias changes no routing "
                       f"decision, so this strategy does not read the aux-free bias; the arm "
                       f"is that strategy without the aux loss.")
    return out


def k_shares(run: Mapping[str, Any]) -> list[float]:
    """Share of (layer, token) routings with k = 0, 1, ... experts (evaluation)."""
    hist = [sum(h[i] for h in run["k_hist_by_layer"])
            for i in range(len(run["k_hist_by_layer"][0]))]
    return [c / max(sum(hist), 1) for c in hist]


def _variation(arms: Mapping[str, Any]) -> list[str]:
    """Does k really vary? The share of routings at each dynamic arm's most common k."""
    modal = {n: max(k_shares(a["runs"][0])) for n, a in arms.items() if a["dynamic"]}
    if not modal:
        return []
    fixed = [n for n, share in modal.items() if share > 0.9]
    return [f"k really varies (no single k for more than 90% of routings) in "
            f"{len(modal) - len(fixed)} of {len(modal)} dynamic arms; "
            + ("every one varies." if not fixed else "nearly constant: " + ", ".join(
                f"{arms[n]['label']} ({100 * modal[n]:.0f}% at one k)" for n in fixed) + ".")]


def _settings(arm: Mapping[str, Any]) -> str:
    """The arm's router fields, compactly (``num_experts`` and ``causal`` left out)."""
    fields = {k: v for k, v in arm["router"].items() if k not in ("num_experts", "causal")}
    text = ", ".join(f"{k}={v}" for k, v in fields.items())
    if arm.get("relu_k_target") is not None:
        text += f"; adaptive L1 on the gates toward k={arm['relu_k_target']}"
    return f"`{text}`"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A Markdown table; the first ``left`` columns left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _image(docs: Path, out: Path, name: str) -> str:
    # raw HTML: mkdocs leaves it alone (a Markdown image outside docs/ fails --strict)
    rel = Path(os.path.relpath(plot_path(out, name), docs.parent)).as_posix()
    return f'<img src="{rel}" alt="{PLOTS[name]}" width="720">'


def render(data: Mapping[str, Any], docs: Path, out: Path) -> str:
    """The Markdown page for ``data`` (written to ``docs``; plots in ``out``)."""
    meta, arms = data["meta"], data["arms"]
    m, size, train = meta["machine"], meta["model"], meta["train"]
    lines = ["# Dynamic routing, measured", "",
             "<!-- Generated by benchmarks/dynamic_routing.py from "
             f"{meta['json']}; do not edit by hand "
             "(tests/test_dynamic_routing_smoke.py checks it). -->", "",
             "Does choosing the number of experts per token save expert compute at equal "
             "quality, against static top-k? A tiny byte-level MoE language model is trained "
             "once per routing arm from the same initialisation and data order; the result is "
             "reported whichever way it falls.", "", "## Conclusion", ""]
    lines += [f"- {c}" for c in conclusions(data)]
    lines += ["", f"Scale caveat: {size['layers']} layers, d_model {size['d_model']}, "
              f"{train['steps']} steps of {train['batch']} x {size['seq_len']} bytes "
              f"({meta['tokens_per_arm']:,} training bytes per arm). Huang et al. 2024 found "
              "their saving (about 1.76 experts per token against 2) after full pre-training "
              "with the dynamic router; a run this small tests the mechanism, not that claim.",
              "", "## Command and machine", "", "```bash", meta["command"], "```", "",
              f"- machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; "
              f"torch {m['torch']}, Python {m['python']}, {m['platform']}",
              f"- date (UTC): {meta['date']}; total wall time {data['total_wall_s'] / 60:.1f} "
              f"min; preset `{meta['preset']}`",
              f"- seeds: {', '.join(map(str, meta['seeds']))} (seed = initialisation and data "
              f"order); second seeds for: {', '.join(data['second_seed_arms']) or 'none'}",
              f"- data: {meta['data']['source']}, {meta['data']['files_train']} train / "
              f"{meta['data']['files_val']} validation files ({meta['data']['split']}); "
              f"validation: {meta['val_windows']} windows, {meta['val_bytes']:,} predicted "
              f"bytes", f"- model: {size['layers']} layers, d_model {size['d_model']}, "
              f"{size['heads']} heads, {size['experts']} experts of width {size['expert_d_ff']} "
              f"({size['activation']}), `moe_router.torch.MoE`; AdamW lr {train['lr']}, "
              f"{train['schedule']}", "",
              "Arms (every one trained from the same initialisation and data order; fields "
              "are `RouterConfig` fields):", ""]
    lines += _table(["arm", "router settings"], [[a["label"], _settings(a)]
                                                  for a in arms.values()], left=2)
    lines += ["", "Notes on the arms: top-1 gates with the router probability, as the Switch "
              "Transformer does (renormalized, a single gate would always be 1 and the router would"
              " get no gradient from the task loss). ReLU routing runs without the z-loss, which "
              "pushes every logit below zero and so switches all ReLU gates off; its k is steered "
              "by ReMoE's adaptive L1 on the gates instead. The load-balancing loss of null-expert "
              "routing is null-aware (AdaMoE): it balances over all E + N choices with the null "
              "experts pooled, so moving probability onto the null experts does not lower it for "
              "free.", "",
              "Expert FLOPs relative to top-2 = mean experts per token / 2 (null and dropped "
              "slots cost nothing); measured at evaluation (the routing a deployed model "
              "would use). Training k is the mean over all training steps.", "",
              "## Results per arm", ""]
    rows = []
    for name, arm in arms.items():
        r = arm_row(arm)
        rows.append([arm["label"], ", ".join(map(str, r["seeds"])),
                     f"{arm['runs'][0]['val_bpb']:.3f}",
                     f"{r['bpb']:.3f}{_pm(r['bpb_pm'])}", f"{r['k']:.2f}{_pm(r['k_pm'], 2)}",
                     f"{r['flops']:.2f}", f"{r['train_k']:.2f}", f"{r['load']:.2f}",
                     f"{r['z']:.2f}", str(r["dropped"]), f"{r['wall']:.0f}"])
    lines += _table(["arm", "seeds", f"val bits/byte, seed {meta['seeds'][0]}",
                     "val bits/byte, all seeds", "mean k (eval)", "FLOPs vs top-2",
                     "mean k (train)", "max/mean load", "z-loss", "dropped", "wall s"], rows)
    lines += ["", "All seeds: the mean, ± half the range over the seeds listed. Compare arms "
              f"on the seed {meta['seeds'][0]} column (same initialisation and data order for "
              "every arm). max/mean load: the worst layer over the validation set; z-loss: "
              "mean over layers.", "",
              "### Mean k by layer and the k histogram (evaluation, first seed)", ""]
    rows = []
    for arm in arms.values():
        run = arm["runs"][0]
        shares = " / ".join(f"{k}:{100 * c:.1f}%" for k, c in enumerate(k_shares(run)) if c)
        rows.append([arm["label"], " / ".join(f"{k:.2f}" for k in run["k_by_layer"]), shares])
    lines += _table(["arm", "k by layer (1..L)", "share of tokens with k experts (all layers)"],
                    rows, left=3)
    lines += ["", "### Over training", "", _image(docs, out, "k_over_training"), ""]
    rows = []
    for arm in arms.values():
        c = arm["runs"][0]["curve"]
        ks = [sum(v) / len(v) for v in c["k_by_layer"]]
        idx = sorted({0, len(ks) // 4, len(ks) // 2, len(ks) - 1})
        rows.append([arm["label"], " / ".join(f"{c['step'][i]}:{ks[i]:.2f}" for i in idx),
                     " / ".join(f"{s}:{b:.3f}" for s, b in zip(arm["runs"][0]["val_curve"][
                         "step"], arm["runs"][0]["val_curve"]["val_bpb"]))])
    lines += _table(["arm", "training k (step:k)", "validation bits/byte (step:bpb)"], rows,
                    left=3)
    lines += ["", "## Pareto view", "", _image(docs, out, "pareto"), ""]
    seed = meta["seeds"][0]
    if static_frontier(arms, seed) is not None:
        rows = [[a["label"], f"{excess_over_frontier(arms, n, seed):+.3f}"]
                for n, a in arms.items() if a["dynamic"]]
        lines += _table(["dynamic arm", f"bits/byte vs the top-1/top-2 line at its FLOPs "
                                        f"(seed {seed}, paired)"], rows) + [""]
    best = data.get("best_dynamic")
    if best in arms:
        lines += [f"Best dynamic arm, chosen on seed {meta['seeds'][0]} before any second seed "
                  f"ran (lowest bits/byte relative to that line, or to top-2 without top-1): "
                  f"**{arms[best]['label']}**.", ""]
    lines += _switch_section(data, docs, out) + _synthetic_section(data, docs, out)
    lines += _bias_section(data)
    return "\n".join(lines).rstrip() + "\n"


def _switch_section(data: Mapping[str, Any], docs: Path, out: Path) -> list[str]:
    switch = data.get("inference_switch")
    if not switch:
        return []
    rows = [[p["family"], f"{p['param']}={p['value']}", f"{p['k_mean']:.2f}",
             f"{p['val_bpb']:.3f}"] for p in switch["points"]]
    return ["## Inference-time switch", "",
            f"The trained top-2 model (seed {switch['seed']}) routed with other strategies "
            "through `moe_router.torch.set_strategy`, without retraining; the trained top-1 "
            "and top-2 arms are on the same axes.", "", _image(docs, out, "switch"), ""] + \
        _table(["strategy", "setting", "mean k", "val bits/byte"], rows) + [""]


def _synthetic_section(data: Mapping[str, Any], docs: Path, out: Path) -> list[str]:
    syn = data.get("synthetic")
    lines: list[str] = []
    if syn:
        cfg = syn["config"]
        lines += ["## Do harder tokens get more experts?", "",
                  f"Synthetic task: blocks `a b op r` of digits mod {cfg['modulus']}; `op` is "
                  "`c` (copy: r = a, predictable by looking back) or `+` (r = (a + b) mod "
                  f"{cfg['modulus']}, needs arithmetic); a, b, op are random, and the "
                  "position predicting r holds op, so the router can see what comes next. "
                  f"A {cfg['layers']}-layer version of the same model, {cfg['steps']} steps of "
                  f"{cfg['batch']} sequences of {cfg['blocks']} blocks, seed {cfg['seed']}; "
                  f"evaluated on {cfg['eval_sequences']} held-out "
                  "sequences. k is counted at the position that predicts the token (mean over "
                  "layers); intervals are 95% bootstrap over sequences.", "",
                  _image(docs, out, "synthetic"), ""]
        rows = []
        for s in syn["arms"].values():
            c = s["classes"]
            rows.append([s["label"]] + [
                f"{c[n]['k_mean']:.2f} [{c[n]['k_ci'][0]:.2f}, {c[n]['k_ci'][1]:.2f}]"
                for n in CLASSES] + [
                f"{c['arith_minus_copy']['k_diff']:+.3f} [{c['arith_minus_copy']['ci'][0]:+.3f},"
                f" {c['arith_minus_copy']['ci'][1]:+.3f}]"] + [
                f"{c[n]['p_correct']:.2f}" for n in ("copy", "arith")])
        lines += _table(["arm"] + [f"k: {n}" for n in CLASSES] +
                        ["arith - copy", "p(right): copy", "p(right): arith"], rows) + [""]
    corr = [(a["label"], a["runs"][0].get("loss_k_corr")) for a in data["arms"].values()]
    corr = [(label, c) for label, c in corr if c and c.get("spearman") is not None]
    if corr:
        lines += ["### Text: per-byte loss against k", "",
                  "Validation bytes of the first seed; k is the mean over layers at the position "
                  "predicting the byte; the interval is a 95% bootstrap over windows.", ""]
        lines += _table(["arm", "Pearson", "Spearman [95% CI]", "k, easiest quarter",
                         "k, hardest quarter"],
                        [[label, f"{c['pearson']:+.3f}", f"{c['spearman']:+.3f} "
                          f"[{c['spearman_ci'][0]:+.3f}, {c['spearman_ci'][1]:+.3f}]",
                          f"{c['k_easiest_quarter']:.2f}", f"{c['k_hardest_quarter']:.2f}"]
                         for label, c in corr]) + [""]
    return lines


def _bias_section(data: Mapping[str, Any]) -> list[str]:
    rows = [[a["label"], " / ".join(f"{100 * v:.1f}%" for v in r["bias_effect"][
        "routing_changed_by_layer"]), " / ".join(f"{v:.3f}" for v in r["bias_effect"][
            "bias_range_by_layer"])]
            for a in data["arms"].values() for r in a["runs"][:1] if "bias_effect" in r]
    if not rows:
        return []
    return ["## Aux-free bias: does it steer the routing?", "",
            "Share of validation tokens whose experts change when the trained bias is set to "
            "zero, by layer, and the bias's range (max - min). Where nothing changes, the "
            "strategy does not read the bias and the arm is simply that strategy without the "
            "aux loss.", ""] + _table(["arm", "routing changed by the bias (by layer)",
                                       "bias range (by layer)"], rows) + [""]


def write_report(data: Mapping[str, Any], out: Path, docs: Path) -> list[Path]:
    """Write the plots into ``out`` and the page to ``docs``; returns the files written."""
    from .plots import make_plots

    written = make_plots(data, out)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render(data, docs, out))
    return [*written, docs]
