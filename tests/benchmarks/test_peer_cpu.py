"""benchmarks/peer_cpu.py on the micro row: ours full, ours partial and HF's ViTMAEForPreTraining alternate round after
round in one process; the medians and the ratios are those of the recorded runs."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest
from helpers import load_benchmark

from mae_et.files import FileError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the peer needs the [bench] extra (transformers)"
)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    out = tmp_path_factory.mktemp("peer")
    script = load_benchmark("peer_cpu")
    result = script.main(["--rows", "micro", "--rounds", "3", "--warmup", "1", "--out", str(out)])
    return script, result, out


def test_contenders_alternate_and_the_figures_are_medians_of_their_runs(peer):
    script, result, out = peer
    row = result["rows"]["micro"]
    names = ["ours_full", "ours_partial", "hf_full"]
    assert row["order"] == [names, names[1:] + names[:1], names[2:] + names[:2]]  # each round starts elsewhere
    for name in names:
        runs = row["runs"][name]
        assert len(runs) == 3 and all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in runs)
        assert row["median"][name]["cpu_s"] == statistics.median(r["cpu_s"] for r in runs)
        assert row["median"][name]["img_s_cpu"] == pytest.approx(4 / row["median"][name]["cpu_s"])
    for ours in ("ours_full", "ours_partial"):
        assert row["time_ratio"][f"{ours}_over_hf"]["cpu_s"] == pytest.approx(
            row["median"][ours]["cpu_s"] / row["median"]["hf_full"]["cpu_s"]
        )
    assert row["params"] > 0 and row["decode_fraction_partial"] == 0.25
    saved = json.loads((out / "peer_cpu.json").read_text())
    assert saved["rows"]["micro"]["median"] == json.loads(json.dumps(row["median"]))
    assert saved["threads"] == 1 and saved["command"].startswith("python benchmarks/peer_cpu.py")
    md = (out / "peer_cpu.md").read_text()
    assert "| micro | 4 | ours_partial | 0.25 |" in md and "micro: ours full / HF full" in md


def test_the_peer_is_the_same_model(peer):
    script, _, _ = peer
    cfg = script.row_config(script.ROWS["micro"], 1.0)
    from benchmarks.throughput import count_params, hf_model
    from mae_et.models.mae import build_mae
    from mae_et.train.config import mae_spec

    assert count_params(hf_model(cfg)) == count_params(build_mae(mae_spec(cfg)))


def test_an_existing_result_is_not_overwritten_silently(peer):
    script, _, out = peer
    with pytest.raises(FileError, match="already holds peer_cpu.json; pass --overwrite"):
        script.main(["--rows", "micro", "--rounds", "1", "--out", str(out)])
