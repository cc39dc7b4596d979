"""benchmarks/loader_decode.py on the mini set: every size timed beside today's path, the pixel distance of each
row, the verdict on the target size, and no result written over an earlier one."""

from __future__ import annotations

import json

import pytest
from helpers import MINI, load_benchmark

from mae_et.files import FileError


def test_rows_ratios_distances_and_verdict(tmp_path):
    bench = load_benchmark("loader_decode")
    result = bench.main(["--data", str(MINI / "train"), "--images", "12", "--rounds", "2", "--out", str(tmp_path)])
    assert [r["size"] for r in result["rows"]] == [224, 160, 96]
    for r in result["rows"]:
        assert r["stage_over_today"] == pytest.approx(r["stage_img_per_cpu_s"] / r["today_img_per_cpu_s"])
        assert len(result["times"][f"stage_{r['size']}"]) == 2  # one timing per round
    distance = {r["size"]: r["pixel_distance"] for r in result["rows"]}
    assert distance[224] < 0.5 and 0 < distance[96] < 3.0  # the bound of tests/data/test_folder.py, per image set
    assert result["verdicts"][0].startswith("B=96: stage-sized decoding gives")
    assert json.loads((tmp_path / "loader_decode.json").read_text())["rows"] == result["rows"]
    with pytest.raises(FileError, match="already holds loader_decode.json; pass --overwrite"):
        bench.main(["--data", str(MINI / "train"), "--images", "4", "--rounds", "1", "--out", str(tmp_path)])
