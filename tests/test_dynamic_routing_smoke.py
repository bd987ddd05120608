"""Smoke test of ``benchmarks/dynamic_routing.py`` (issue 12) at a toy size: the experiment runs
end to end (2 arms, 2 seeds, the inference-time switch, the synthetic task), its JSON holds
consistent numbers, and the docs page is exactly what the report step generates from the JSON,
for the toy run and for the committed ``docs/dynamic-routing.md`` / JSON pair."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dynamic_routing as bench  # noqa: E402
import torch  # noqa: E402
from dynamic_routing_lib import analysis, data, model, report  # noqa: E402

TOY_ARMS = ("top2", "top_p_target")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    """One toy run: (its JSON, the output folder, the generated page)."""
    out = tmp_path_factory.mktemp("dynamic_routing_toy")
    docs = out / "page" / "dynamic-routing.md"
    argv = ["--preset", "toy", "--arms", ",".join(TOY_ARMS), "--threads", "1",
            "--out", str(out), "--docs", str(docs)]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets it; leave other tests as they were
    return json.loads((out / bench.JSON_NAME).read_text()), out, docs


def test_runs_every_part(toy: tuple[dict[str, Any], Path, Path]) -> None:
    result, out, docs = toy
    assert list(result["arms"]) == list(TOY_ARMS)
    assert result["second_seed_arms"][:2] == ["top2", "top_p_target"]
    for name in TOY_ARMS:
        assert [r["seed"] for r in result["arms"][name]["runs"]] == [0, 1]
    assert set(result["synthetic"]["arms"]) == set(TOY_ARMS)
    assert result["inference_switch"]["points"]
    for name in report.PLOTS:
        assert report.plot_path(out, name).stat().st_size > 1000
    assert docs.is_file()
    assert result["meta"]["command"].startswith("python3 scripts/dev.py bench dynamic_routing")
    assert result["meta"]["machine"]["torch"] == torch.__version__


def test_numbers_are_consistent(toy: tuple[dict[str, Any], Path, Path]) -> None:
    result = toy[0]
    for name, arm in result["arms"].items():
        for run in arm["runs"]:
            assert run["flops_rel_top2"] == pytest.approx(run["k_mean"] / 2)
            assert run["k_mean"] == pytest.approx(np.mean(run["k_by_layer"]))
            assert run["dropped"] == 0  # dropless
            # better than uniform bytes (8 bits) after a few steps, and finite
            assert math.isfinite(run["val_bpb"]) and run["val_bpb"] < 8.0
            shares = report.k_shares(run)
            assert sum(shares) == pytest.approx(1.0)
            assert sum(k * s for k, s in enumerate(shares)) == pytest.approx(run["k_mean"])
            assert len(run["curve"]["k_by_layer"][0]) == result["meta"]["model"]["layers"]
            assert all(x >= 1.0 for x in run["load_max_over_mean_by_layer"])
    top2 = result["arms"]["top2"]["runs"][0]
    assert top2["k_by_layer"] == [2.0] * result["meta"]["model"]["layers"]
    # the switch's top-k k=2 point is the trained top-2 model routed as trained
    points = {(p["family"], p["value"]): p for p in result["inference_switch"]["points"]}
    assert points[("top-k", 2)]["val_bpb"] == pytest.approx(top2["val_bpb"], abs=1e-6)
    assert points[("top-k", 1)]["k_mean"] == 1.0
    for syn in result["synthetic"]["arms"].values():
        for cls in data.CLASSES:
            c = syn["classes"][cls]
            assert c["k_ci"][0] - 1e-9 <= c["k_mean"] <= c["k_ci"][1] + 1e-9
            assert 0.0 < c["p_correct"] < 1.0


def test_page_is_generated_from_the_json(toy: tuple[dict[str, Any], Path, Path]) -> None:
    result, out, docs = toy
    page = docs.read_text()
    assert page == report.render(result, docs, out)
    top2 = report.arm_row(result["arms"]["top2"])
    assert f"{top2['bpb']:.3f} ± {top2['bpb_pm']:.3f}" in page
    assert result["meta"]["command"] in page and result["meta"]["machine"]["cpu"] in page
    for line in report.conclusions(result):
        assert f"- {line}" in page
    # --report-only rebuilds the same page from the JSON alone
    again = docs.parent / "again.md"
    assert bench.main(["--preset", "toy", "--report-only", "--out", str(out),
                       "--docs", str(again)]) == 0
    assert again.read_text() == page


def test_committed_page_matches_committed_json() -> None:
    committed = ROOT / "benchmarks" / "results" / bench.JSON_NAME
    if not committed.is_file():
        pytest.skip("benchmarks/results/dynamic_routing.json not committed yet")
    page = ROOT / "docs" / "dynamic-routing.md"
    result = json.loads(committed.read_text())
    assert page.read_text() == report.render(result, page, committed.parent), \
        "regenerate: python3 scripts/dev.py bench dynamic_routing --report-only"


def test_conclusion_wording_follows_the_sign(toy: tuple[dict[str, Any], Path, Path]) -> None:
    result = copy.deepcopy(toy[0])
    for arm_runs, k in ((result["arms"]["top_p_target"]["runs"], 1.5),):
        for run in arm_runs:
            run["k_mean"], run["flops_rel_top2"] = k, k / 2
    line = report.conclusions(result)[0]
    assert "25.0% fewer expert FLOPs than top-2" in line
    for run in result["arms"]["top_p_target"]["runs"]:
        run["k_mean"], run["flops_rel_top2"] = 2.5, 1.25
        run["val_bpb"] = result["arms"]["top2"]["runs"][0]["val_bpb"] + 1.0
    line = report.conclusions(result)[0]
    assert "25.0% more expert FLOPs" in line and "worse than top-2" in line


def test_arms_share_initialisation_and_data_order() -> None:
    size = model.ModelSize(layers=1, d_model=16, heads=2, seq_len=8)
    a = model.build_model(size, model.ARMS["top_p_target"], seed=3).state_dict()
    b = model.build_model(size, model.ARMS["null"], seed=3).state_dict()
    for name, tensor in a.items():
        if name.endswith("router.weight"):
            assert torch.equal(b[name][:, : model.NUM_EXPERTS], tensor)
            assert b[name].shape[1] == model.NUM_EXPERTS + 4
        elif not name.endswith(("router.state", "router.expert_bias")):
            assert torch.equal(b[name], tensor), name
    text = np.arange(1000, dtype=np.uint8)
    first = list(data.train_batches(text, 3, 2, 8, seed=5))
    assert all(np.array_equal(x, y) for x, y in zip(first, data.train_batches(text, 3, 2, 8, 5)))
    assert not np.array_equal(first[0], next(data.train_batches(text, 1, 2, 8, seed=6)))


def test_synthetic_task_follows_its_rule() -> None:
    tokens, kind = data.synthetic_batch(np.random.default_rng(0), 8, 6, modulus=7)
    blocks = tokens.reshape(8, 6, 4)
    a, b, op, r = (blocks[..., i] for i in range(4))
    digits = [x - data.DIGIT0 for x in (a, b, r)]
    expected = np.where(op == data.ADD_OP, (digits[0] + digits[1]) % 7, digits[0])
    assert np.array_equal(digits[2], expected)
    assert set(np.unique(op)) == {data.ADD_OP, data.COPY_OP}
    # position t predicts token t + 1: the class of every r, 0 elsewhere
    target_kind = np.concatenate([np.zeros((8, 1), np.int64), kind], axis=1).reshape(8, 6, 4)
    assert np.array_equal(target_kind[..., 3], np.where(op == data.ADD_OP, 2, 1))
    assert not target_kind[..., :3].any()


def test_corpus_split_is_by_file() -> None:
    files = data.stdlib_files()
    assert files and not any("site-packages" in f.parts for f in files)
    root = Path(data.sysconfig.get_paths()["stdlib"])
    val = [f for f in files if data.is_validation(f.relative_to(root).as_posix())]
    assert 0 < len(val) < len(files) / 4


def test_statistics_helpers() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.array([3.0, 1.0, 3.0, 2.0, 5.0, 1.0])
    assert np.array_equal(analysis.average_ranks(x), scipy_stats.rankdata(x) - 1)
    rng = np.random.default_rng(0)
    sums, counts = rng.random(50) * 4, np.full(50, 2)
    mean, lo, hi = analysis.bootstrap_mean_ci(sums, counts, rng)
    assert mean == pytest.approx(sums.sum() / counts.sum())
    assert lo < mean < hi


def test_bias_effect_sees_that_both_strategies_read_the_bias() -> None:
    size = model.ModelSize(layers=1, d_model=16, heads=2, seq_len=8)
    windows = np.random.default_rng(0).integers(0, 256, (4, 9))
    changed = {}
    for name in ("top2_bias", "top_p_bias"):
        lm = model.build_model(size, model.ARMS[name], seed=0)
        with torch.no_grad():
            lm.moe[0].router.expert_bias.copy_(torch.linspace(-1.0, 1.0, model.NUM_EXPERTS))
        changed[name] = analysis_bias(lm, windows)
    assert changed["top2_bias"] > 0.5
    assert changed["top_p_bias"] > 0.5  # top-p chooses its experts in the biased order too


def analysis_bias(lm: model.TinyMoELM, windows: np.ndarray) -> float:
    from dynamic_routing_lib.train import bias_effect

    return bias_effect(lm, windows)["routing_changed_by_layer"][0]
