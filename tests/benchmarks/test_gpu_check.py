"""benchmarks/gpu_check.py, the one-call GPU check, dry-run on the CPU: every branch that needs no CUDA.

One dry run (micro model, batch 8, B = 48 / 32, a few steps per row, the mini data) is shared by the tests
below; it takes a few seconds on one thread.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import counted_forward_flops, in_process_run, load_benchmark

from benchmarks.gpu.plan import DRY_PLAN
from benchmarks.gpu.report import Report
from benchmarks.gpu.sections import make_jpeg_folder
from benchmarks.gpu.steps import StepBench, step_ratios
from benchmarks.gpu.tables import compiled_over_hf, targets
from benchmarks.throughput import Timing
from mae_et.data.folder import scan_image_folder
from mae_et.models.mae import mae_vit
from mae_et.train.config import load_pretrain_config


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def run_check(argv: list[str]) -> dict:
    with in_process_run():
        return load_benchmark("gpu_check").main(argv)


@pytest.fixture(scope="module")
def dry(tmp_path_factory, mini_root):
    out = tmp_path_factory.mktemp("gpu_check")
    t0 = time.perf_counter()
    result = run_check(["--dry-run", "--data", str(mini_root), "--out", str(out)])
    result["_test_wall_s"] = time.perf_counter() - t0
    return result, out


def step_rows(result, **match):
    return [r for r in result["step"] if all(r[k] == v for k, v in match.items())]


def test_dry_run_writes_the_json_and_the_markdown(dry):
    result, out = dry
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["dry_run"] is True and saved["failed"] == []
    assert saved["device"] and saved["torch"] == torch.__version__ and saved["date"]
    assert saved["matmul_tflops"] > 0 and saved["peak_tflops"] == saved["matmul_tflops"]
    assert saved["step"] == result["step"] and saved["probe"] == json.loads(json.dumps(result["probe"]))
    assert 0 < saved["elapsed_s"] < saved["budget_s"]
    md = (out / "gpu_check.md").read_text()
    for heading in (
        "## Train step",
        "## Ours / Hugging Face",
        "## Each B against the full size",
        "## End to end",
        "## Fractal renderer",
        "## Training probe",
        "## Targets",
        "## Skipped",
    ):
        assert heading in md
    # the only thing a CPU cannot measure is said so, with the reason; without the optional [bench] extra the
    # Hugging Face peer rows are skipped too, each with its reason (test_without_transformers_... checks them)
    peak = {"section": "step", "item": "peak memory", "reason": "CUDA only: torch.cuda.max_memory_allocated"}
    others = [s for s in saved["skipped"] if s != peak]
    assert peak in saved["skipped"]
    if saved["transformers"] is None:
        assert others and all(
            s["item"].startswith("hf ") and "transformers is not installed" in s["reason"] for s in others
        )
    else:
        assert others == []


def test_our_step_rows_eager_and_compiled(dry):
    result, _ = dry
    for model, batch, sizes in DRY_PLAN.models:
        for size in sizes:
            [row] = step_rows(result, impl="ours", model=model, batch=batch, size=size, compile="none")
            assert row["img_s"] > 0 and row["step_ms"] > 0 and row["gflop_per_image"] > 0 and row["mfu"] > 0
            assert row["peak_mem_gib"] is None and row["params"] > 0  # peak memory: CUDA only
    compiled = step_rows(result, impl="ours", compile="default")
    assert [(r["model"], r["batch"], r["size"]) for r in compiled] == [
        (DRY_PLAN.models[i][0], DRY_PLAN.models[i][1], size) for i, size, *kind in DRY_PLAN.compile_order if not kind
    ]
    for r in compiled:
        assert r["img_s"] > 0 and r["compile_s"] >= 0 and r["first_call_s"] >= r["compile_s"]
    # the curriculum's promise: each smaller B against our own full-size figure, same implementation (the
    # arithmetic: test_ratios_and_size_speedups_of_made_up_rows)
    speedups = {(s["impl"], s["compile"], s["size"]): s["over_full_size"] for s in result["size_speedups"]}
    assert ("ours", "none", 32) in speedups and speedups[("ours", "none", 32)] > 0


def test_hugging_face_peer_rows_or_a_skip_reason(dry):
    result, _ = dry
    hf = step_rows(result, impl="hf")
    if not has_transformers():
        assert hf == [] and result["transformers"] is None
        reasons = [s["reason"] for s in result["skipped"] if s["item"].startswith("hf ")]
        assert len(reasons) == sum(len(sizes) for _, _, sizes in DRY_PLAN.models)
        assert all("transformers is not installed" in r for r in reasons)
        return
    assert result["transformers"]
    assert [(r["model"], r["batch"], r["size"]) for r in hf] == [
        (m, b, s) for m, b, sizes in DRY_PLAN.models for s in sizes
    ]
    for r in hf:
        ours = step_rows(result, impl="ours", compile="none", model=r["model"], batch=r["batch"], size=r["size"])[0]
        assert r["img_s"] > 0 and r["attn_implementation"] == "sdpa"
        assert r["interpolate_pos_encoding"] == (r["size"] != 48)
        assert r["params"] == ours["params"]  # the same architecture: same trainable parameters
        assert r["gflop_per_image"] == ours["gflop_per_image"]
        [ratio] = [
            x for x in result["ratios"] if (x["model"], x["batch"], x["size"]) == (r["model"], r["batch"], r["size"])
        ]
        # each ratio row names the rows it divides (its arithmetic: test_ratios_and_size_speedups_of_made_up_rows)
        assert ratio["hf_img_s"] == r["img_s"] and ratio["ours_none_img_s"] == ours["img_s"]
        for c in step_rows(result, impl="ours", compile="default", model=r["model"], batch=r["batch"], size=r["size"]):
            assert ratio["ours_default_img_s"] == c["img_s"]
    assert next(t for t in result["targets"] if t["target"].endswith("ours / HF"))["measured"] > 0


def test_partial_rows_beside_the_full_ones(dry):
    """The main model decoding a share of the patches: eager at the plan's partial sizes and compiled where the compile
    order names it, with the FLOPs of the tokens it decodes, and its ratio to HF's full decoder."""
    result, _ = dry
    model, batch, _ = DRY_PLAN.models[0]
    eager = step_rows(result, impl="ours_partial", compile="none")
    assert [r["size"] for r in eager] == list(DRY_PLAN.partial_sizes)
    compiled = step_rows(result, impl="ours_partial", compile="default")
    assert [r["size"] for r in compiled] == [b for i, b, *kind in DRY_PLAN.compile_order if kind == ["partial"]]
    for r in eager + compiled:
        full = step_rows(result, impl="ours", compile="none", model=model, batch=batch, size=r["size"])[0]
        assert r["decode_fraction"] == DRY_PLAN.partial_fraction and r["params"] == full["params"]
        assert r["gflop_per_image"] < full["gflop_per_image"] and r["img_s"] > 0
    if has_transformers():
        [ratio] = [x for x in result["ratios"] if (x["model"], x["batch"], x["size"]) == (model, batch, 48)]
        hf = step_rows(result, impl="hf", model=model, batch=batch, size=48)[0]
        assert ratio["hf_img_s"] == hf["img_s"] and ratio["ours_partial_none_img_s"] == eager[0]["img_s"]
        assert ratio["ours_partial_default_img_s"] == compiled[0]["img_s"]
        target = next(t for t in result["targets"] if "ours partial" in t["target"])
        assert target["measured"] > 0 and target["met"] == (target["measured"] >= 1.5)


def made_up_step(impl, model, batch, size, compile_mode, img_s):
    return dict(impl=impl, model=model, batch=batch, size=size, compile=compile_mode, img_s=img_s, peak_mem_gib=None)


# img/s chosen so every ratio is a round number
MADE_UP_STEPS = [
    made_up_step("ours", "micro", 8, 48, "none", 400.0),
    made_up_step("ours", "micro", 8, 48, "default", 500.0),
    made_up_step("ours", "micro", 8, 32, "none", 1000.0),
    made_up_step("ours", "micro", 8, 32, "default", 1500.0),
    made_up_step("ours_partial", "micro", 8, 48, "none", 600.0),
    made_up_step("ours_partial", "micro", 8, 48, "default", 700.0),
    made_up_step("hf", "micro", 8, 48, "none", 200.0),
    made_up_step("hf", "micro", 8, 32, "none", 250.0),
    made_up_step("ours", "micro", 4, 48, "none", 100.0),
]


def test_a_step_row_from_a_known_timing():
    """8 images in 20 ms: 400 img/s; MFU = FLOPs per image (counted by torch on the dry plan's model) x 400 over
    the 2 TFLOP/s peak."""
    rows = []
    bench = SimpleNamespace(peak_tflops=2.0, report=SimpleNamespace(add=lambda section, row: rows.append(row)))
    cfg = load_pretrain_config(DRY_PLAN.config, ["data.root=.", "model.size=micro", "train.batch_size=8"])
    timing = Timing(seconds_per_step=0.02, first_call_s=1.5, peak_mem_gib=None)
    row = StepBench.record(bench, "ours", "micro", 8, 48, "none", timing, cfg, params=123)
    model = mae_vit("micro", patch_size=8, img_size=48, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    flops = 3 * counted_forward_flops(model, torch.zeros(2, 3, 48, 48))
    assert rows == [row] and row["img_s"] == pytest.approx(400.0) and row["step_ms"] == pytest.approx(20.0)
    assert row["gflop_per_image"] == pytest.approx(flops / 1e9, rel=1e-12)
    assert row["mfu"] == pytest.approx(flops * 400 / 2e12, rel=1e-12)
    assert (row["first_call_s"], row["params"], row["peak_mem_gib"]) == (1.5, 123, None)


def test_ratios_and_size_speedups_of_made_up_rows():
    report = SimpleNamespace(data={"step": [dict(r) for r in MADE_UP_STEPS]}, save=lambda: None)
    step_ratios(report, crop=48)
    ratios = {(r["model"], r["batch"], r["size"]): r for r in report.data["ratios"]}
    assert set(ratios) == {("micro", 8, 48), ("micro", 8, 32)}  # one per HF row
    at_48, at_32 = ratios[("micro", 8, 48)], ratios[("micro", 8, 32)]
    assert at_48["hf_img_s"] == 200.0 and at_48["ours_none_over_hf"] == 2.0 and at_48["ours_default_over_hf"] == 2.5
    assert at_48["ours_partial_none_over_hf"] == 3.0 and at_48["ours_partial_default_over_hf"] == 3.5
    assert at_32["ours_none_over_hf"] == 4.0 and at_32["ours_default_over_hf"] == 6.0
    assert "ours_partial_none_over_hf" not in at_32  # no partial row at B=32
    assert compiled_over_hf(at_48) == 2.5 and compiled_over_hf(at_48, "ours_partial") == 3.5
    speedups = {
        (r["impl"], r["batch"], r["compile"], r["size"]): r["over_full_size"] for r in report.data["size_speedups"]
    }
    # each B against the same implementation, batch and compile mode at the full size; none for the full size itself
    assert speedups == {("ours", 8, "none", 32): 2.5, ("ours", 8, "default", 32): 3.0, ("hf", 8, "none", 32): 1.25}


def test_targets_of_made_up_rows():
    data = {
        "step": MADE_UP_STEPS,
        "hog": [{"model": "micro", "batch": 8, "size": 48, "target_share": 0.04}],
        "e2e": [{"pipeline": "memory", "size": 48, "fraction_of_step": 0.8}],
    }
    found = {t["target"]: t for t in targets(data, DRY_PLAN, crop=48)}
    vs_hf = found["micro b8 B=48: ours / HF"]  # the fastest of ours (compiled, 500) over HF's 200
    assert (vs_hf["measured"], vs_hf["met"], vs_hf["note"]) == (2.5, True, "ours default")
    partial = found["micro b8 B=48: ours partial (0.25 decoded) / HF full"]
    assert (partial["measured"], partial["met"]) == (3.5, True)
    assert (found["micro b4 B=48 img/s"]["measured"], found["micro b4 B=48 img/s"]["met"]) == (100.0, False)
    hog = found["micro b8 B=48: HOG target / HOG step"]
    assert (hog["measured"], hog["met"]) == (0.04, True)
    e2e = found["end to end memory B=48 / step"]
    assert (e2e["measured"], e2e["met"]) == (0.8, False)
    for mode in ("none", "default"):  # peak memory: measured on CUDA only, so no verdict
        peak = found[f"micro b8 B=48 peak GiB (compile {mode})"]
        assert peak["measured"] is None and peak["met"] is None and peak["note"] == "CUDA only"
    # B = 34 and 21 (160/224 and 96/224 of 48) were not measured: no target row invented for them
    assert len(found) == 2 + 1 + 1 + 1 + 2


def test_without_transformers_the_peer_is_skipped_with_the_reason(tmp_path, mini_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    result = run_check(
        [
            "--dry-run",
            "--data",
            str(mini_root),
            "--out",
            str(tmp_path),
            "--skip",
            "compile",
            "large",
            "e2e",
            "fractal",
            "probe",
        ]
    )
    assert result["transformers"] is None and step_rows(result, impl="hf") == [] and result["ratios"] == []
    reasons = {s["item"]: s["reason"] for s in result["skipped"]}
    reason = "transformers is not installed (pip install -e '.[bench]')"
    assert reasons["hf micro b8 B=48"] == reasons["hf micro b8 B=32"] == reason
    assert {"compiled rows", "model micro b4", "all"} <= set(reasons) and len(step_rows(result, impl="ours")) == 2


def test_end_to_end_rows_for_both_fast_pipelines_and_the_shard_source(dry):
    result, _ = dry
    rows = result["e2e"]
    assert [(r["pipeline"], r["size"]) for r in rows] == [
        (p, s) for p in ("memory", "device_decode", "shards") for s in DRY_PLAN.e2e_sizes
    ]
    for r in rows:
        assert r["img_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["num_images"] == 240
        assert r["fraction_of_step"] == pytest.approx(r["img_s"] / r["step_img_s"])
        step = step_rows(result, impl="ours", model="micro", batch=8, size=r["size"], compile=r["compile"])[0]
        assert r["step_img_s"] == step["img_s"]  # beside the step that ran it


def test_hog_rows_beside_the_pixel_step(dry):
    """The HOG-target step (its own model, head 27 wide at patch 8) at the plan's HOG sizes, the target alone, its
    share of the step and the ratio to section a's pixel step at the same B, with a target line each."""
    result, out = dry
    model, batch, _ = DRY_PLAN.models[0]
    rows = result["hog"]
    assert [r["size"] for r in rows] == list(DRY_PLAN.hog_sizes)
    for r in rows:
        step = step_rows(result, impl="ours_hog", size=r["size"])[0]
        pixel = step_rows(result, impl="ours", compile="none", model=model, batch=batch, size=r["size"])[0]
        assert r["hog_step_ms"] == step["step_ms"] and r["pixel_step_ms"] == pixel["step_ms"]
        assert r["hog_over_pixel_step"] == pytest.approx(step["step_ms"] / pixel["step_ms"])
        assert r["target_share"] == pytest.approx(r["hog_target_ms"] / r["hog_step_ms"]) and r["hog_target_ms"] > 0
        assert step["gflop_per_image"] < pixel["gflop_per_image"]  # the head predicts 27 values, not 192
        target = next(t for t in result["targets"] if t["target"].endswith(f"B={r['size']}: HOG target / HOG step"))
        assert target["measured"] == r["target_share"] and target["met"] == (r["target_share"] <= 0.05)
    assert "## HOG target (model.target=hog), eager" in (out / "gpu_check.md").read_text()


def test_fractal_rows(dry):
    result, _ = dry
    assert [r["size"] for r in result["fractal"]] == list(DRY_PLAN.fractal_sizes)
    assert all(r["img_s"] > 0 and r["device"] == "cpu" for r in result["fractal"])


def test_training_probe_baseline_and_et_same_images_losses_fall(dry):
    result, _ = dry
    probe = result["probe"]
    base, et = probe["runs"]["baseline"], probe["runs"]["et"]
    assert base["images"] == et["images"] == base["steps"] * base["batch"] > 0 and base["steps"] == et["steps"]
    for run in (base, et):
        assert run["train_s"] > 0 and run["loss_falling"] and run["last_loss"] < run["first_loss"]
        assert all(torch.isfinite(torch.tensor(p["loss"])) for p in run["curve"])
    assert {p["size"] for p in base["curve"]} == {48}
    assert min(p["size"] for p in et["curve"]) < 48 and et["curve"][-1]["size"] == 48  # the curriculum ran
    assert probe["wall_ratio"] == pytest.approx(et["train_s"] / base["train_s"])
    assert 0.5 < probe["planned_flops_ratio"] < 1.0 and base["planned_flops_ratio"] == 1.0


def test_targets_are_reported_not_asserted(dry):
    result, _ = dry
    names = [t["target"] for t in result["targets"]]
    assert any("ours / HF" in n for n in names) and any(n.startswith("end to end") for n in names)
    assert any("peak GiB" in n for n in names) and any("img/s" in n for n in names)
    for t in result["targets"]:
        assert t["goal"] and (t["met"] is None) == (t["measured"] is None)


def test_dry_run_is_seconds(dry):
    result, _ = dry
    assert result["_test_wall_s"] < 120  # a few seconds on one idle thread; generous for a loaded CI machine


def test_a_spent_budget_skips_every_section_with_its_reason(tmp_path, mini_root):
    result = run_check(["--dry-run", "--data", str(mini_root), "--out", str(tmp_path), "--budget-s", "0"])
    assert result["step"] == result["e2e"] == result["hog"] == result["fractal"] == [] and result["probe"] is None
    skipped = result["skipped"]
    sections = {s["section"] for s in skipped}
    assert {"step", "e2e", "hog", "fractal", "probe"} <= sections
    allowed = ("budget", "CUDA only", "did not run", "transformers is not installed")
    assert all(any(a in s["reason"] for a in allowed) for s in skipped)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["skipped"] == skipped


def test_an_item_past_its_limit_is_stopped_and_recorded(tmp_path):
    report = Report(
        tmp_path, budget_s=60, header={"device": "cpu", "torch": "x", "transformers": None, "date": "today"}
    )
    t0 = time.perf_counter()
    with report.guard("probe", "endless", limit_s=1.0):
        while True:
            time.sleep(0.02)
    assert 0.9 < time.perf_counter() - t0 < 5
    [failure] = report.data["failed"]
    assert failure["section"] == "probe" and failure["error"].startswith("OutOfTime: stopped after 1 s")
    with report.guard("probe", "broken"):
        raise ValueError("boom")
    assert report.data["failed"][-1]["error"] == "ValueError: boom"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed"] == report.data["failed"]


def test_jpegs_made_on_the_spot_form_an_image_folder(tmp_path):
    root = make_jpeg_folder(tmp_path / "jpegs", per_class=2, side=32)
    index = scan_image_folder(root / "train", strict=True)
    assert len(index.samples) == 4 and not index.skipped
