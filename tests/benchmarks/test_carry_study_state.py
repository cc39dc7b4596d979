"""benchmarks/carry_study_state.py: a study's finished rows carried into another state.json, nothing else."""

from __future__ import annotations

import copy
import json

import pytest

from benchmarks.carry_study_state import main
from benchmarks.study.state import StudyState, carry_finished, is_finished


def entry(key: str, evaluated: bool = True) -> dict:
    e = {"pretrain": {"key": [f"name={key}"], "value": {"run_dir": f"runs/{key}", "steps": 10}}}
    if evaluated:
        e["eval"] = {"key": {"encoder": [f"name={key}"]}, "value": {"knn_top1_cls": 40.0}}
    return e


def source() -> dict:
    return {
        "runs": {
            "baseline": {"0": entry("baseline_seed0"), "1": entry("baseline_seed1", evaluated=False)},
            "et": {"0": entry("et_seed0")},
            "untrained": {"0": entry("untrained_seed0")},
        },
        "launches": {"baseline_seed0": 2, "baseline_seed1": 1, "et_seed0": 1},
    }


def test_only_finished_rows_are_carried_and_the_target_keeps_finished_rows_only():
    dst = {
        "runs": {
            "et": {"0": entry("et_seed0_other")},  # finished, different settings: kept, not replaced
            "etpp": {"1": entry("etpp_seed1", evaluated=False)},  # only pretrained: its checkpoints are gone
        },
        "launches": {"baseline_seed0": 1, "etpp_seed1": 1},
    }
    said = carry_finished(source(), dst)
    assert said == {
        "carried": ["baseline seed 0", "untrained seed 0"],
        "dropped": ["etpp seed 1"],
        "kept": ["et seed 0"],
    }
    assert set(dst["runs"]) == {"baseline", "et", "untrained"}
    assert set(dst["runs"]["baseline"]) == {"0"}  # seed 1 was only pretrained in the source
    assert dst["runs"]["baseline"]["0"] == entry("baseline_seed0")
    assert dst["runs"]["et"]["0"] == entry("et_seed0_other")
    assert all(is_finished(e) for per_seed in dst["runs"].values() for e in per_seed.values())
    assert dst["launches"]["baseline_seed0"] == 2  # the larger count: it was launched twice in all
    # carrying again changes nothing
    again = copy.deepcopy(dst)
    assert carry_finished(source(), again)["carried"] == ["baseline seed 0", "untrained seed 0"] and again == dst


def test_rows_limits_what_is_carried_and_the_study_reads_the_carried_entries(tmp_path):
    src, dst = tmp_path / "a" / "state.json", tmp_path / "b" / "state.json"
    src.parent.mkdir()
    src.write_text(json.dumps(source()))
    said = main([str(src), str(dst), "--rows", "baseline", "untrained"])
    assert said["carried"] == ["baseline seed 0", "untrained seed 0"]
    state = StudyState(dst)  # what the study opens
    assert state.get("baseline", 0, "pretrain", ["name=baseline_seed0"]) == {
        "run_dir": "runs/baseline_seed0",
        "steps": 10,
    }
    assert state.get("baseline", 0, "pretrain", ["name=other"]) is None  # other settings: trained again
    assert state.get("et", 0, "pretrain", ["name=et_seed0"]) is None
    assert json.loads(src.read_text()) == source()  # the source is only read


@pytest.mark.parametrize(
    ("text", "message"),
    [(None, "no such state.json"), ("{", "not JSON"), ('{"launches": {}}', "no 'runs'")],
)
def test_a_bad_source_is_one_line(tmp_path, capsys, text, message):
    src = tmp_path / "state.json"
    if text is not None:
        src.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        main([str(src), str(tmp_path / "out.json")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "out.json").exists()


def test_the_same_file_is_refused(tmp_path, capsys):
    src = tmp_path / "state.json"
    src.write_text(json.dumps(source()))
    with pytest.raises(SystemExit):
        main([str(src), str(src)])
    assert "are the same file" in capsys.readouterr().err
    assert json.loads(src.read_text()) == source()
