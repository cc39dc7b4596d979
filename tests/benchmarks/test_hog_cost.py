"""benchmarks/hog_cost.py on the micro row: the pixel step, the HOG step and the HOG target alone alternate round after
round in one process; the medians and the ratios are those of the recorded runs."""

from __future__ import annotations

import json
import statistics

import pytest
from helpers import load_benchmark

from mae_et.files import FileError


@pytest.fixture(scope="module")
def cost(tmp_path_factory):
    out = tmp_path_factory.mktemp("hog_cost")
    script = load_benchmark("hog_cost")
    result = script.main(["--rows", "micro", "--rounds", "3", "--warmup", "1", "--out", str(out)])
    return script, result, out


def test_the_figures_are_medians_of_the_alternating_runs(cost):
    script, result, out = cost
    row = result["rows"]["micro"]
    for name in script.CONTENDERS:
        runs = row["runs"][name]
        assert len(runs) == 3 and all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in runs)
        assert row["median"][name]["cpu_s"] == statistics.median(r["cpu_s"] for r in runs)
    q = row["ratios"]["cpu_s"]
    assert q["hog_target_over_hog_step"] == pytest.approx(
        row["median"]["hog_target"]["cpu_s"] / row["median"]["hog_step"]["cpu_s"]
    )
    assert q["hog_step_over_pixel_step"] == pytest.approx(
        row["median"]["hog_step"]["cpu_s"] / row["median"]["pixel_step"]["cpu_s"]
    )
    saved = json.loads((out / "hog_cost.json").read_text())
    assert saved["rows"]["micro"]["median"] == json.loads(json.dumps(row["median"]))
    assert saved["command"].startswith("python benchmarks/hog_cost.py") and saved["threads"] == 1
    md = (out / "hog_cost.md").read_text()
    assert "| micro | 4 |" in md and "micro: the HOG target is" in md


def test_the_contenders_differ_only_in_the_target(cost):
    script, _, _ = cost
    pixel, hog = (script.row_config(script.ROWS["micro"], t) for t in ("pixel", "hog"))
    assert (pixel.model.target, pixel.model.norm_pix_loss, hog.model.target, hog.model.norm_pix_loss) == (
        "pixel",
        True,
        "hog",
        False,
    )
    from mae_et.models.mae import build_mae
    from mae_et.train.config import mae_spec

    assert build_mae(mae_spec(hog)).decoder_pred.out_features == 27
    assert build_mae(mae_spec(pixel)).decoder_pred.out_features == 192


def test_an_existing_result_is_not_overwritten_silently(cost):
    script, _, out = cost
    with pytest.raises(FileError, match="already holds hog_cost.json; pass --overwrite"):
        script.main(["--rows", "micro", "--rounds", "1", "--out", str(out)])
