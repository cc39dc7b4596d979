"""benchmarks/carry_study_state.py: a study's finished rows carried into another state.json, nothing else."""

from __future__ import annotations

import copy
import fcntl
import json
import threading

import pytest

from benchmarks.carry_study_state import main
from benchmarks.study.state import ROLE_LOCKS, StudyState, carry_finished, is_finished
from mae_et.files import RunFolderLock


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
    assert state.get("baseline", 0, "pretrain", ["name=other", "train.seed=1"]) is None  # other settings: trained again
    assert state.get("et", 0, "pretrain", ["name=et_seed0"]) is None
    assert json.loads(src.read_text()) == source()  # the source is only read


def test_a_renamed_row_is_read_back_by_its_settings_under_its_new_name(tmp_path):
    """An ablation row of one study carried as a run of another: the settings key holds no row name, so the new
    study reads the entry back under the new name; anything else in the key still decides."""
    src, dst = tmp_path / "a" / "state.json", tmp_path / "b" / "state.json"
    src.parent.mkdir()
    data = source()
    data["runs"]["et+full"] = {"0": entry("et+full_seed0")}
    data["runs"]["et+full"]["0"]["pretrain"]["key"].append("train.seed=0")
    data["launches"]["et+full_seed0"] = 3
    src.write_text(json.dumps(data))
    said = main([str(src), str(dst), "--rows", "et+full", "--rename", "et+full=et_full"])
    assert said["carried"] == ["et_full seed 0"]
    state = StudyState(dst)
    assert set(state.data["runs"]) == {"et_full"} and state.data["launches"] == {"et_full_seed0": 3}
    carried = state.get("et_full", 0, "pretrain", ["train.seed=0", "name=et_full_seed0"])
    assert carried["run_dir"] == "runs/et+full_seed0"
    assert state.get("et_full", 0, "eval", {"encoder": ["name=et_full_seed0"]}) == {"knn_top1_cls": 40.0}
    assert state.get("et_full", 0, "pretrain", ["train.seed=1", "name=et_full_seed0"]) is None


def test_a_row_waiting_for_its_evaluation_takes_the_one_made_elsewhere():
    """A running study's row pretrained elsewhere (its folder shared) and evaluated by the other study's process:
    carried in, it is finished, not kept as it was; one of other settings is kept."""
    src = source()
    dst = {"runs": {"et": {"0": entry("et_seed0", evaluated=False)}}, "launches": {}}
    said = carry_finished(src, dst, rows=["et"], keep_unfinished=True)
    assert said["carried"] == ["et seed 0"] and dst["runs"]["et"]["0"] == entry("et_seed0")
    dst = {"runs": {"et": {"0": entry("et_other", evaluated=False)}}, "launches": {}}
    assert carry_finished(src, dst, rows=["et"], keep_unfinished=True)["kept"] == ["et seed 0"]
    assert dst["runs"]["et"]["0"] == entry("et_other", evaluated=False)


@pytest.mark.parametrize("bad", ["et", "=et_full", "et=", "et=a et=b"])
def test_a_bad_rename_is_one_line(tmp_path, capsys, bad):
    src = tmp_path / "state.json"
    src.write_text(json.dumps(source()))
    with pytest.raises(SystemExit) as e:
        main([str(src), str(tmp_path / "b.json"), "--rename", *bad.split()])
    assert e.value.code == 2 and "--rename" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


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


def test_a_running_study_keeps_its_rows_waiting_for_evaluation_and_loses_no_write(tmp_path):
    """DST whose folder a study process works in (its pretraining lock held): the row it pretrained and has not
    evaluated yet stays, and the carry waits for the state lock that process writes under."""
    src, dst = tmp_path / "a" / "state.json", tmp_path / "b" / "state.json"
    src.parent.mkdir()
    dst.parent.mkdir()
    src.write_text(json.dumps(source()))
    waiting = {"runs": {"etpp": {"0": entry("etpp_seed0", evaluated=False)}}, "launches": {"etpp_seed0": 1}}
    dst.write_text(json.dumps(waiting))
    pretraining = RunFolderLock(dst.parent, lock_name=ROLE_LOCKS["pretrain"]).acquire()  # as the study holds it
    state_lock = open(dst.with_suffix(".lock"), "w")
    fcntl.flock(state_lock, fcntl.LOCK_EX)  # a study process in the middle of a write
    said: dict = {}
    carrying = threading.Thread(target=lambda: said.update(main([str(src), str(dst)])))
    try:
        carrying.start()
        carrying.join(timeout=1.0)
        assert carrying.is_alive() and json.loads(dst.read_text()) == waiting  # it waits for the lock
        # the study's write lands first; the carry then reads it and keeps it
        waiting["runs"]["etpp"]["0"]["eval"] = None
        waiting["launches"]["etpp_seed1"] = 1
        dst.write_text(json.dumps(waiting))
    finally:
        state_lock.close()
        carrying.join(timeout=30)
        pretraining.release()
    assert not carrying.is_alive()
    after = json.loads(dst.read_text())
    assert said["dropped"] == [] and said["carried"] == ["baseline seed 0", "et seed 0", "untrained seed 0"]
    assert after["runs"]["etpp"]["0"]["pretrain"] == entry("etpp_seed0")["pretrain"]  # kept: it waits for its eval
    assert after["launches"]["etpp_seed1"] == 1  # the write made while the carry waited is not lost


def test_a_study_that_has_ended_drops_its_unfinished_rows(tmp_path):
    """The role locks' files stay behind when a study ends; free, they do not make DST live."""
    src, dst = tmp_path / "a" / "state.json", tmp_path / "b" / "state.json"
    src.parent.mkdir()
    dst.parent.mkdir()
    src.write_text(json.dumps(source()))
    dst.write_text(json.dumps({"runs": {"etpp": {"0": entry("etpp_seed0", evaluated=False)}}, "launches": {}}))
    RunFolderLock(dst.parent, lock_name=ROLE_LOCKS["eval"]).acquire().release()  # the file is there, the lock free
    assert (dst.parent / ROLE_LOCKS["eval"]).is_file()
    assert main([str(src), str(dst)])["dropped"] == ["etpp seed 0"]
    assert "etpp" not in json.loads(dst.read_text())["runs"]
