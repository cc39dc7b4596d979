"""FLOP accounting, the throughput benchmark's CPU smoke run, and its honesty: it measures what it is given."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, counted_forward_flops, load_benchmark

from mae_et.models.flops import mae_train_flops_per_image
from mae_et.models.mae import build_mae, mae_vit
from mae_et.train.config import load_pretrain_config, mae_spec


def load_throughput():
    return load_benchmark("throughput")


def micro_train_flops(size: int) -> float:
    """The CPU test recipe's model (micro, patch 8, decoder 32 x 1) at input size `size`: 3x its forward FLOPs as
    torch's counter counts them on the real model (the training convention: forward + backward = 3 forwards)."""
    model = mae_vit("micro", patch_size=8, img_size=48, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return 3 * counted_forward_flops(model, torch.zeros(2, 3, size, size))


@pytest.mark.parametrize("size, gflop", [(224, 58.7), (192, 42.9), (160, 29.7), (128, 19.1), (96, 11.0)])
def test_vit_base_train_flops_match_the_design_table(size, gflop):
    # ViT-B/16 MAE (512 x 8 decoder, mask 0.75) train FLOPs per image at each curriculum size, as the project's design
    # table counted them by hand (matmuls only, 3x the forward); flops.py must give the same to 0.06 GFLOP
    assert mae_train_flops_per_image("base", size) / 1e9 == pytest.approx(gflop, abs=0.06)


def test_smaller_inputs_cost_fewer_flops_roughly_with_the_area():
    full = mae_train_flops_per_image("base", 224)
    ratio = full / mae_train_flops_per_image("base", 96)
    assert 4.5 < ratio < (224 / 96) ** 2  # attention makes it a bit less than the area ratio


@pytest.mark.parametrize("pipeline", ["loader", "memory"])
def test_throughput_smoke_run_writes_the_table(tmp_path, mini_root, pipeline):
    throughput = load_throughput()
    out = tmp_path / "tp.json"
    result = throughput.main(
        ["--smoke", "--data", str(mini_root), "--num-workers", "0", "--pipeline", pipeline, "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["size"] for r in saved["rows"]] == [48, 40, 32] and saved["pipeline"] == pipeline
    # --smoke is what shrinks: the micro model at patch 8, eager fp32
    assert (
        {r["model"] for r in saved["rows"]} == {"micro"} and saved["precision"] == "fp32" and saved["compile"] == "none"
    )
    for r in saved["rows"]:
        assert r["flops_per_image"] == micro_train_flops(r["size"])  # the model measured, counted independently
        assert r["step_img_s"] > 0 and r["e2e_img_s"] > 0 and 0 <= r["e2e_data_wait"] <= 1 and r["mfu"] > 0
    assert saved["peak_dtype"] == "float32"  # an fp32 run: measured against an fp32 matmul, not a bf16 peak


@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_mfu_denominator_is_measured_in_the_runs_compute_dtype(
    tmp_path, monkeypatch, one_thread_fresh_accelerate, precision, dtype
):
    throughput = load_throughput()
    asked = []

    def fake_matmul_tflops(device, n, dtype):
        asked.append(dtype)
        return 2.0  # TFLOP/s

    def fixed_clock(run, steps, warmup, device, base_bytes=0):
        run()  # the real step, once; its time is set so the row's rates are known in advance
        return throughput.Timing(seconds_per_step=0.01, first_call_s=0.0, peak_mem_gib=None)

    monkeypatch.setattr(throughput, "matmul_tflops", fake_matmul_tflops)
    monkeypatch.setattr(throughput, "time_calls", fixed_clock)
    result = throughput.main(
        [
            "--rows",
            "micro:2:32",
            "--compile",
            "none",
            "--precision",
            precision,
            "--steps",
            "1",
            "--warmup",
            "0",
            "--config",
            str(REPO / "configs/pretrain/mae_vit-micro-p8_et_cpu-test.yaml"),
            "--out",
            str(tmp_path / "tp.json"),
        ]
    )
    assert (
        [str(d) for d in asked] == [f"torch.{dtype}"] and result["peak_dtype"] == dtype and result["peak_tflops"] == 2.0
    )
    # 2 images in 10 ms: 200 img/s; MFU = the counted FLOPs per image x 200 / the 2 TFLOP/s peak
    [row] = result["rows"]
    flops = micro_train_flops(32)
    assert row["step_img_s"] == pytest.approx(200.0) and row["step_ms"] == pytest.approx(10.0)
    assert row["mfu"] == pytest.approx(flops * 200 / 2e12, rel=1e-12)
    # and a peak given on the command line is used as given, with nothing measured
    asked.clear()
    given = throughput.main(
        [
            "--rows",
            "micro:2:32",
            "--compile",
            "none",
            "--precision",
            precision,
            "--steps",
            "1",
            "--warmup",
            "0",
            "--peak-tflops",
            "4",
            "--config",
            str(REPO / "configs/pretrain/mae_vit-micro-p8_et_cpu-test.yaml"),
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    assert asked == [] and given["rows"][0]["mfu"] == pytest.approx(flops * 200 / 4e12, rel=1e-12)


def test_throughput_measures_the_requested_model_on_cpu(tmp_path, one_thread_fresh_accelerate):
    # no CUDA here, and no --smoke: the model asked for is the model measured (ViT-Ti/16, the recipe's decoder)
    throughput = load_throughput()
    result = throughput.main(
        [
            "--rows",
            "tiny:2:32",
            "--compile",
            "none",
            "--precision",
            "fp32",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path / "tp.json"),
        ]
    )
    [row] = result["rows"]
    assert (row["model"], row["batch"], row["size"]) == ("tiny", 2, 32) and row["step_img_s"] > 0
    recipe = REPO / "configs/pretrain/mae_vit-base-p16_baseline_800e_imagenet.yaml"
    tiny = build_mae(mae_spec(load_pretrain_config(recipe, ["data.root=.", "model.size=tiny"])))
    assert row["params"] == sum(p.numel() for p in tiny.parameters() if p.requires_grad)
    # patch 16, decoder 512 x 8 (not shrunk): the recipe's model, its FLOPs counted on it by torch
    assert row["flops_per_image"] == pytest.approx(
        3 * counted_forward_flops(tiny, torch.zeros(2, 3, 32, 32)), rel=1e-12
    )
    assert result["precision"] == "fp32" and result["compile"] == "none"


def test_fractal_speed_smoke():
    module = load_benchmark("fractal_speed")
    rows = module.main(["--sizes", "32", "--batch", "4", "--seconds", "0.2", "--device", "cpu"])
    assert [r["size"] for r in rows] == [32] and rows[0]["single_cpu"] > 0 and rows[0]["batched"] > 0


def test_throughput_takes_any_recipe_and_checks_no_monitor_it_never_runs(tmp_path, one_thread_fresh_accelerate):
    """The fractal recipe has a kNN monitor on a held-out split of its renders: the benchmark used to replace its
    source by an image folder and then fail the monitor's check ('needs a labelled split')."""
    throughput = load_throughput()
    result = throughput.main(
        [
            "--config",
            str(REPO / "configs/pretrain/mae_vit-tiny-p8_et_20e_fractal.yaml"),
            "--rows",
            "tiny:2:32",
            "--compile",
            "none",
            "--precision",
            "fp32",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path / "tp.json"),
        ]
    )
    [row] = result["rows"]
    assert row["size"] == 32 and row["step_img_s"] > 0 and result["pipeline"] is None
