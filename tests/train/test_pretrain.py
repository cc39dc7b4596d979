"""End-to-end pretraining on the real mini data set: curriculum, resume, DDP, bad files, faults."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    CPU_RECIPE,
    ONE_THREAD_ENV,
    REPO,
    call_main,
    copy_mini_classes,
    in_process_run,
    make_bad_folder,
    official_pth,
    reset_accelerate,
    transformers_folder,
)
from safetensors.torch import load_file

from mae_et import checkpoint as ck
from mae_et.cli import run_user_command
from mae_et.errors import UserError
from mae_et.files import RunFolderLock
from mae_et.models.mae import MaskedAutoencoderViT, build_mae
from mae_et.models.start import StartPointError
from mae_et.run.run import NonFiniteLossError, RunInterrupted
from mae_et.train.config import load_pretrain_config, mae_spec
from mae_et.train.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # each in-process run builds its own Accelerator


def cfg_for(tmp_path, data_root, *overrides):
    return load_pretrain_config(CPU_RECIPE, [f"data.root={data_root}", f"output_dir={tmp_path}", *overrides])


def cli(*args, timeout=300, check=True, env=ONE_THREAD_ENV):
    """Run the real entry point, as a user would (one intra-op thread, as every run the tests compare it with)."""
    cmd = [sys.executable, str(REPO / "pretrain.py"), "--config", str(CPU_RECIPE), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def main_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """pretrain.py's main() with the CPU recipe and `args`, in this process: its exit status, stdout and stderr, as
    `cli` gives them (helpers.call_main)."""
    from pretrain import main

    return call_main(main, ["--config", str(CPU_RECIPE), *args], capsys)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ck.list_checkpoints(run_dir / "checkpoints")[-1] / ck.MODEL_FILE))


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_tiny_run_end_to_end_with_the_et_curriculum(tmp_path, mini_root):
    result = pretrain(
        cfg_for(tmp_path, mini_root, "train.epochs=3", "checkpoint.keep_last=5", "tracking.knn_every_epochs=2")
    )
    run_dir = result.run_dir
    records = metrics(run_dir)
    # the curriculum really ran: B = 32 / 40 / 48 in that order, ending at full size
    sizes = [r["size"] for r in records]
    assert sizes == sorted(sizes) and {32, 40, 48} <= set(sizes) and sizes[-1] == 48
    for key in (
        "loss",
        "lr",
        "size",
        "images_per_sec",
        "data_wait_frac",
        "epoch",
        "nonfinite_skipped",
        "data_skipped_files",
    ):
        assert key in records[0], key
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 and r["images_per_sec"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert records[-1]["epoch"] == pytest.approx(3.0)
    # the online kNN monitor ran at epoch 2 and at the end, on the held-out val split
    knn_steps = [r["step"] for r in records if "knn_top1_cls" in r]
    assert knn_steps == [30, 45]
    assert all(
        0.0 <= r["knn_top1_cls"] <= 100.0 and 0.0 <= r["knn_top1_mean"] <= 100.0 for r in records if "knn_top1_cls" in r
    )
    # the resolved config, periodic + final checkpoints, and reconstruction grids
    assert (run_dir / "config.yaml").is_file()
    ckpts = ck.list_checkpoints(run_dir / "checkpoints")
    assert [int(p.name[5:]) for p in ckpts] == [15, 30, 45]  # every epoch of 15 steps
    meta = json.loads((ckpts[-1] / "meta.json").read_text())
    assert meta["complete"] and meta["size"] == 48 and meta["step"] == 45
    assert sorted(p.name for p in (run_dir / "reconstructions").iterdir()) == ["step_00000030.png", "step_00000045.png"]
    # the checkpoint holds the full MAE (decoder included) under the reference names
    cfg = load_pretrain_config(CPU_RECIPE, [f"data.root={mini_root}"])
    model = build_mae(mae_spec(cfg))
    model.load_state_dict(final_weights(run_dir), strict=True)
    assert any(k.startswith("decoder_blocks.") for k in final_weights(run_dir))
    state = torch.load(ckpts[-1] / ck.STATE_FILE, weights_only=True)
    assert {
        "optimizer",
        "scaler",
        "step",
        "counters",
        "rng",
        "elapsed_seconds",
        "cpu_seconds",
        "overhead_seconds",
        "overhead_cpu_seconds",
    } <= set(state)
    # the loop's clocks: wall and process CPU, each with the bookkeeping share (checkpoints, grids, kNN) beside it
    for a, b in zip(records, records[1:]):
        assert b["elapsed_s"] > a["elapsed_s"] and b["cpu_s"] > a["cpu_s"]
        assert b["overhead_s"] >= a["overhead_s"] and b["overhead_cpu_s"] >= a["overhead_cpu_s"]
    last = records[-1]
    assert 0 < last["overhead_s"] < last["elapsed_s"] and 0 < last["overhead_cpu_s"] < last["cpu_s"]
    assert last["cpu_s"] <= 1.05 * torch.get_num_threads() * last["elapsed_s"] + 0.5  # CPU time of this process only


@pytest.mark.parametrize("share", ["1.0", "0.25"])
def test_relaunch_resumes_and_ends_with_the_same_weights(tmp_path, mini_root, share):
    """A run of 2N steps == a run stopped at N (max_steps), then relaunched with the same command; also when the
    decoder reconstructs a quarter of the patches (chosen by the mask's noise: a pure function of the step)."""
    common = [
        "train.epochs=2",
        "train.deterministic=true",
        "checkpoint.every_steps=100",
        "train.accum_steps=2",
        "train.batch_size=8",
        f"model.decode_fraction={share}",
    ]
    straight = pretrain(cfg_for(tmp_path / "a", mini_root, *common))
    reset_accelerate()
    first = pretrain(cfg_for(tmp_path / "b", mini_root, *common, "train.max_steps=13"))
    assert first.step == 13 and [p.name for p in ck.list_checkpoints(first.run_dir / "checkpoints")] == [
        "step_00000013"
    ]
    reset_accelerate()
    resumed = pretrain(cfg_for(tmp_path / "b", mini_root, *common))
    assert resumed.step == straight.step == 30
    assert_same_weights(final_weights(straight.run_dir), final_weights(resumed.run_dir))
    records = metrics(resumed.run_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps))  # the resumed run continued the metrics file, no duplicates
    # the clocks carried over from the checkpoint: they go on rising across the relaunch
    assert all(b["elapsed_s"] > a["elapsed_s"] and b["cpu_s"] > a["cpu_s"] for a, b in zip(records, records[1:]))


STRAIGHT = ["train.epochs=3", "train.deterministic=true", "checkpoint.every_steps=5", "tracking.recon_every_epochs=0"]


@pytest.fixture(scope="module")
def straight_args(mini_root, micro_run) -> list[str]:
    """STRAIGHT on the mini set, continuing the pretraining of the session's micro run (model.init): the kill and
    busy-folder tests then also show that a relaunch resumes its own checkpoints, never the start point again."""
    return [f"data.root={mini_root}", f"model.init={micro_run}", *STRAIGHT]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, straight_args) -> Path:
    """The run folder of one uninterrupted CLI run of STRAIGHT (every checkpoint kept), the reference of the kill
    tests (folder and shards) and of the busy-folder test."""
    out = tmp_path_factory.mktemp("straight")
    assert "starting from mae_et weights" in cli(*straight_args, "checkpoint.keep_last=9", f"output_dir={out}").stdout
    return out / CPU_RECIPE.stem


def comparable(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without their clock and speed fields (which differ between any two runs)."""
    clocks = {"elapsed_s", "cpu_s", "overhead_s", "overhead_cpu_s", "images_per_sec", "data_wait_frac"}
    return [{k: v for k, v in r.items() if k not in clocks} for r in records]


def test_a_second_launch_on_a_busy_run_folder_stops_and_touches_nothing(tmp_path, straight_args, straight_run):
    """Two launches of one command at once (a requeued job while the old one runs): the second exits 2 in one
    line naming the holder; the first ends with the weights and metrics of a lone run (its first 10 steps)."""
    args = [*straight_args, "train.max_steps=10", f"output_dir={tmp_path}"]
    run_dir = tmp_path / CPU_RECIPE.stem
    first = subprocess.Popen(
        [sys.executable, str(REPO / "pretrain.py"), "--config", str(CPU_RECIPE), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD_ENV,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoints").is_dir():  # training, lock held
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # it keeps its lock, and the second launch surely meets it
    try:
        assert (run_dir / "checkpoints").is_dir(), "the first run never got going"
        second = cli(*args, check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert second.returncode == 2 and "step " not in second.stdout
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"is in use by another run (pid {first.pid} on host" in lines[0] and "started " in lines[0]
    assert "wait for it to end, or give this run another output_dir= or name=" in lines[0]
    lone = load_file(str(straight_run / "checkpoints" / "step_00000010" / ck.MODEL_FILE))
    assert_same_weights(lone, final_weights(run_dir), atol=0)
    assert comparable(metrics(run_dir)) == [r for r in comparable(metrics(straight_run)) if r["step"] <= 10]


def sigkill_at_step_10(args: list[str], out: Path) -> None:
    """Launch the real CLI with `args` into `out`, SIGKILL it once its checkpoint of step 10 exists (a moment that
    may fall inside the next save or step)."""
    cmd = [sys.executable, str(REPO / "pretrain.py"), "--config", str(CPU_RECIPE), *args, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD_ENV)
    ckpt_root = out / CPU_RECIPE.stem / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in ck.list_checkpoints(ckpt_root) if p.name >= "step_00000010"]:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ck.list_checkpoints(ckpt_root)[-1].name
    assert "step_00000010" <= killed_at < "step_00000020", f"killed at {killed_at}: too late for the test"


# Runs pretrain.py with its checkpoint writer patched to SIGKILL the process at one point inside the second save.
KILL_INSIDE_A_SAVE = """
import os, runpy, signal, sys
from pathlib import Path
from mae_et import checkpoint as ck
where, saves = sys.argv[1], [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
real_save, real_save_file = ck.save_checkpoint, ck.save_safetensors
real_fsync, real_replace = ck._fsync_path, ck.os.replace
def save_checkpoint(*a, **k):
    saves[0] += 1
    return real_save(*a, **k)
def save_file(*a, **k):  # the first file of the folder
    real_save_file(*a, **k)
    if where == "model_written" and saves[0] == 2:
        die()
def fsync(path):  # the folder itself is fsynced last, once every file in it is
    real_fsync(path)
    if where == "files_synced" and saves[0] == 2 and Path(path).name.startswith(ck.TMP_PREFIX):
        die()
def replace(src, dst):
    real_replace(src, dst)
    if where == "renamed" and saves[0] == 2 and Path(dst).name.startswith(ck.CHECKPOINT_PREFIX):
        die()
ck.save_checkpoint, ck.save_safetensors, ck._fsync_path, ck.os.replace = save_checkpoint, save_file, fsync, replace
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_run_killed_at_any_moment_and_inside_each_checkpoint_write_relaunches_to_the_same_weights(
    tmp_path, straight_args, straight_run
):
    """One run folder, killed again and again with SIGKILL, each time relaunched with the same command: at a moment
    no one chose (right after the checkpoint of step 10: maybe inside the next save), then at known points inside
    a save (the relaunch's second): half a folder written, every file written but the folder not yet renamed,
    renamed but the older one not yet pruned (keep_last=1). A half-written folder is invisible; each relaunch resumes
    from the last whole checkpoint, never loads the start point (model.init) again, and takes the run folder that
    the killed run's lock file still names (a SIGKILL releases the OS lock); the last one ends with the weights of
    the uninterrupted run, nothing half-written left."""
    args = [*straight_args, "checkpoint.keep_last=1"]
    out = tmp_path / "killed"
    ckpt_root = out / CPU_RECIPE.stem / "checkpoints"
    sigkill_at_step_10(args, out)
    assert (out / CPU_RECIPE.stem / ".run.lock").is_file()

    def step_of(checkpoint: Path) -> int:
        return int(checkpoint.name[len(ck.CHECKPOINT_PREFIX) :])

    for where in ("model_written", "files_synced", "renamed"):
        resume_from = ck.list_checkpoints(ckpt_root)[-1]
        cmd = [sys.executable, "-c", KILL_INSIDE_A_SAVE, where, str(REPO / "pretrain.py"), "--config", str(CPU_RECIPE)]
        env = {**ONE_THREAD_ENV, "PYTHONUNBUFFERED": "1"}  # its lines reach the pipe before the kill
        killed = subprocess.run([*cmd, *args, f"output_dir={out}"], cwd=REPO, capture_output=True, text=True,
                                timeout=300, env=env)  # fmt: skip
        assert killed.returncode == -9, (where, killed.stdout + killed.stderr)  # it died inside its second save
        assert f"resumed from {resume_from}" in killed.stdout and "starting from" not in killed.stdout, killed.stdout
        # (a SIGKILL may also leave the writer's free lock file beside: not a folder, and the next save removes it)
        half_written = [p.name for p in ckpt_root.iterdir() if p.name.startswith(ck.TMP_PREFIX) and p.is_dir()]
        first_save = step_of(resume_from) + 5  # a checkpoint every 5 steps
        listed = [step_of(p) for p in ck.list_checkpoints(ckpt_root)]
        if where == "renamed":  # keep_last=1 had not pruned yet
            assert listed == [first_save, first_save + 5] and not half_written, (listed, half_written)
        else:  # the half-written one is invisible; the one of the earlier kill was cleaned up
            assert listed == [first_save] and len(half_written) == 1, (where, listed, half_written)
    resume_from = ck.list_checkpoints(ckpt_root)[-1]
    relaunched = cli(*args, f"output_dir={out}")
    assert f"resumed from {resume_from}" in relaunched.stdout and "starting from" not in relaunched.stdout
    assert_same_weights(final_weights(straight_run), final_weights(out / CPU_RECIPE.stem))
    assert not [p for p in ckpt_root.iterdir() if p.name.startswith(ck.TMP_PREFIX)]  # cleaned up by the relaunch


def test_a_run_on_shards_killed_at_any_moment_relaunches_to_the_same_weights(
    tmp_path, mini_root, micro_run, straight_run
):
    """data.source=shards (the shards of the mini set's train/, which read as the folder does): SIGKILL the real
    CLI mid-run, relaunch the same command: the uninterrupted run's weights, bit for bit."""
    from mae_et.data.shards import write_shards

    write_shards(mini_root / "train", tmp_path / "shards", shard_size=50)
    args = [f"data.root={tmp_path / 'shards'}", "data.source=shards", f"data.shard_cache={tmp_path / 'cache'}",
            f"model.init={micro_run}", *STRAIGHT]  # fmt: skip
    out = tmp_path / "killed"
    sigkill_at_step_10(args, out)
    assert "resumed from" in cli(*args, f"output_dir={out}").stdout
    assert_same_weights(final_weights(straight_run), final_weights(out / CPU_RECIPE.stem), atol=0)


def test_ctrl_c_ends_in_one_line_with_the_step_and_the_checkpoint(tmp_path, mini_root):
    """The run is planned far longer than it lives (300 steps, interrupted after its first checkpoint at step 5):
    on a loaded machine 45 steps could all pass between seeing the checkpoint and the SIGINT, and a run that
    ended first looked like a lost Ctrl-C."""
    run_dir = tmp_path / CPU_RECIPE.stem
    cmd = [
        sys.executable,
        str(REPO / "pretrain.py"),
        "--config",
        str(CPU_RECIPE),
        f"data.root={mini_root}",
        *STRAIGHT,
        "train.epochs=20",
        f"output_dir={tmp_path}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ck.list_checkpoints(run_dir / "checkpoints"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    last = ck.list_checkpoints(run_dir / "checkpoints")[-1]
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    m = re.fullmatch(
        r"interrupted at step (\d+) of 300; the last checkpoint is (.+) \(step (\d+)\); "
        r"relaunch the same command to resume",
        lines[-1],
    )
    assert m, lines[-1]
    assert int(m.group(3)) <= int(m.group(1)) and m.group(2) == str(last) and int(m.group(3)) == int(last.name[5:])


def test_a_start_that_fails_its_checks_leaves_no_run_folder(tmp_path, capsys):
    empty = tmp_path / "empty_data"
    empty.mkdir()
    proc = main_in_process(capsys, f"data.root={empty}", f"output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2 and "error:" in proc.stderr
    assert not (tmp_path / "runs").exists()  # made for this run, left empty: removed with its parent


def free_port() -> int:
    """A port no one listens on now (no fixed port: two suites on one machine must not collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_ranks_agree_and_only_rank0_writes(tmp_path, mini_root):
    """Two real processes. The data holds files that fail to decode, met by both ranks over the epochs:
    each counts once. What a user sees on stderr of a skipped file: one line (which, why), not the source line of
    a warnings.warn call."""
    data = tmp_path / "data"
    n_bad = make_bad_folder(data, undecodable_copies=6)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(REPO / "pretrain.py"),
        "--config",
        str(CPU_RECIPE),
        f"data.root={data}",
        f"output_dir={tmp_path / 'out'}",
        "train.epochs=3",
        "train.batch_size=8",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout
    run_dir = tmp_path / "out" / CPU_RECIPE.stem
    final = ck.list_checkpoints(run_dir / "checkpoints")[-1]
    meta = json.loads((final / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch"] == 16
    sums = meta["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    # rank 0 alone writes: one record per step, one of each file, nothing else in the run folder
    records = metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == meta["step"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".run.lock",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "reconstructions",
    ]  # the lock: held by rank 0 for the job
    assert sorted(p.name for p in final.iterdir()) == sorted(
        [ck.MODEL_FILE, ck.STATE_FILE, ck.CONFIG_FILE, ck.META_FILE]
    )
    # every bad file counted once, though the 8 undecodable ones were met by both ranks (each rank warns on its own)
    met = [line.split("'")[1] for line in proc.stderr.splitlines() if line.startswith("warning: cannot decode '")]
    warned = set(met)
    assert len(warned) == n_bad - 2 and len(met) > len(warned)  # some file was met by both ranks: the test can fail
    assert records[-1]["data_skipped_files"] == n_bad
    assert sorted(torch.load(final / ck.STATE_FILE, weights_only=True)["bad_files"]) == sorted(warned)
    # each skipped file is one readable line
    lines = [
        line
        for line in proc.stderr.splitlines()
        if "zero.JPEG" in line or "notes.txt" in line or ".jpg" in line or "truncated" in line or "warn" in line.lower()
    ]
    assert lines and all(line.startswith("warning: ") for line in lines), proc.stderr
    assert "warning: skipping '" in proc.stderr and "zero-byte file" in proc.stderr
    assert "warnings.warn" not in proc.stderr and "UserWarning" not in proc.stderr


# What the two-process runs below share: batch 8 per process, a checkpoint every 3 steps (a requeued job resumes)
TWO_PROCESSES = ["train.batch_size=8", "tracking.recon_every_epochs=0", "tracking.knn_every_epochs=0",
                 "checkpoint.every_steps=3"]  # fmt: skip


def launch_two_processes(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 pretrain.py`: 6 steps of TWO_PROCESSES and `args` into `out`."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(REPO / "pretrain.py"), "--config", str(CPU_RECIPE),
        *TWO_PROCESSES, "train.max_steps=6", *args, f"output_dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, mini_root) -> Path:
    """The run folder of one launch of two processes on the mini set's folder: the reference of the shards and
    Slurm launches."""
    out = tmp_path_factory.mktemp("two_processes")
    launch_two_processes(out, f"data.root={mini_root}")
    return out / CPU_RECIPE.stem


def test_two_process_ddp_on_shards_trains_as_on_the_folder(tmp_path, mini_root, two_process_run):
    """Two real processes reading shards (each rank its part of every epoch): equal checksums on both ranks and
    the same weights, bit for bit, as two processes reading the folder."""
    from mae_et.data.shards import write_shards

    write_shards(mini_root / "train", tmp_path / "shards", shard_size=40)
    launch_two_processes(
        tmp_path / "runs",
        f"data.root={tmp_path / 'shards'}",
        "data.source=shards",
        f"data.shard_cache={tmp_path / 'cache'}",
    )
    for run_dir in (two_process_run, tmp_path / "runs" / CPU_RECIPE.stem):
        meta = json.loads((ck.list_checkpoints(run_dir / "checkpoints")[-1] / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["rank_weight_checksums"][0] == meta["rank_weight_checksums"][1]
    on_folder, on_shards = final_weights(two_process_run), final_weights(tmp_path / "runs" / CPU_RECIPE.stem)
    assert all(torch.equal(on_folder[k], on_shards[k]) for k in on_folder)


def test_bad_files_are_skipped_named_and_counted(tmp_path, mini_root):
    data = tmp_path / "data"
    n_bad = make_bad_folder(data)
    with pytest.warns(UserWarning) as caught:
        result = pretrain(cfg_for(tmp_path, data, "train.epochs=6", "tracking.recon_every_epochs=0"))
    named = " ".join(str(w.message) for w in caught)
    for name in ("zero.JPEG", "notes.txt", "truncated.JPEG", "fake.jpg"):
        assert name in named
    assert metrics(result.run_dir)[-1]["data_skipped_files"] == n_bad


def test_bad_files_met_again_after_a_resume_count_once(tmp_path, mini_root):
    """The undecodable files are met in every epoch; a run stopped after epoch 1 and relaunched meets them again."""
    data = tmp_path / "data"
    n_bad = make_bad_folder(data)
    common = ["train.epochs=4", "tracking.recon_every_epochs=0", "checkpoint.every_epochs=1"]
    with pytest.warns(UserWarning):
        first = pretrain(cfg_for(tmp_path, data, *common, "train.max_steps=8"))
    assert metrics(first.run_dir)[-1]["data_skipped_files"] == n_bad
    reset_accelerate()
    with pytest.warns(UserWarning, match="cannot decode"):  # the relaunch meets them again (and says so)
        resumed = pretrain(cfg_for(tmp_path, data, *common))
    assert resumed.step > 8 and metrics(resumed.run_dir)[-1]["data_skipped_files"] == n_bad


def test_strict_data_turns_the_first_bad_file_into_an_error(tmp_path, mini_root, capsys):
    data = tmp_path / "data"
    make_bad_folder(data)
    proc = main_in_process(capsys, f"data.root={data}", "data.strict=true", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and ("zero.JPEG" in proc.stderr or "notes.txt" in proc.stderr)
    assert "Traceback" not in proc.stderr


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path, mini_root, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = MaskedAutoencoderViT.forward_loss

    def nan_from_step_8(self, imgs, pred, mask):
        calls["n"] += 1
        loss = real_loss(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] > 7 else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", nan_from_step_8)
    cfg = cfg_for(
        tmp_path,
        mini_root,
        "checkpoint.every_steps=6",
        "train.log_every=1",
        "train.max_consecutive_nonfinite=3",
        "tracking.recon_every_epochs=0",
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # as the entry points run it: its own line, exit 1, no traceback
        run_user_command(lambda: pretrain(cfg))
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    run_dir = cfg.run_dir
    assert err[-1] == (
        f"stopped at step 10: 3 non-finite losses in a row (limit train.max_consecutive_nonfinite=3); those "
        f"updates were skipped; the last good checkpoint ({run_dir / 'checkpoints' / 'step_00000006'}) is "
        "untouched. Lower optim.blr, set optim.clip_grad, or use train.precision=bf16/fp32."
    )
    assert not any("Traceback" in line or "NonFiniteLossError" in line for line in err)
    good = ck.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in good] == ["step_00000006"]  # the last good checkpoint, nothing written after
    records = metrics(run_dir)
    assert [r["nonfinite_skipped"] for r in records][-4:] == [0, 1, 2, 3]
    # a window whose every loss was non-finite has no loss: null in metrics.jsonl (not 0.0); the others are means
    assert [r["loss"] for r in records][-3:] == [None, None, None]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in records[:-3])


def nan_on_calls(calls_with_nan: set[int]):
    """A forward_loss that returns NaN on the given (1-based) calls: one call per micro-step here."""
    calls = {"n": 0}
    real_loss = MaskedAutoencoderViT.forward_loss

    def loss(self, imgs, pred, mask):
        calls["n"] += 1
        value = real_loss(self, imgs, pred, mask)
        return value * float("nan") if calls["n"] in calls_with_nan else value

    return loss


@pytest.mark.parametrize("streak, stops", [(3, True), (2, False)])
def test_a_streak_that_ends_between_log_steps_still_stops_the_run(tmp_path, mini_root, monkeypatch, streak, stops):
    """Steps 3.. are skipped `streak` times in a row, then train again; the log step is 10. The run stops at step
    10 when the streak reached the limit (3), though the streak ended at step 5, and runs on when it did not."""
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", nan_on_calls(set(range(3, 3 + streak))))
    cfg = cfg_for(
        tmp_path,
        mini_root,
        "train.log_every=10",
        "checkpoint.every_steps=100",
        "train.max_steps=12",
        "train.max_consecutive_nonfinite=3",
        "tracking.recon_every_epochs=0",
    )
    if stops:
        with pytest.raises(NonFiniteLossError, match="stopped at step 10: 3 non-finite losses in a row"):
            pretrain(cfg)
        assert ck.list_checkpoints(cfg.run_dir / "checkpoints") == []  # nothing written after the streak
    else:
        result = pretrain(cfg)
        assert result.step == 12 and result.last_metrics["nonfinite_skipped"] == 2


def test_a_streak_is_checked_before_a_checkpoint_is_written(tmp_path, mini_root, monkeypatch):
    """A checkpoint step between two log steps checks the streak first: no checkpoint of skipped updates."""
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", nan_on_calls({3, 4, 5}))
    cfg = cfg_for(
        tmp_path,
        mini_root,
        "train.log_every=50",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=10",
        "train.max_consecutive_nonfinite=3",
        "tracking.recon_every_epochs=0",
    )
    with pytest.raises(NonFiniteLossError, match="stopped at step 6: 3 non-finite losses in a row"):
        pretrain(cfg)
    assert [p.name for p in ck.list_checkpoints(cfg.run_dir / "checkpoints")] == ["step_00000002", "step_00000004"]


def test_nonfinite_update_leaves_weights_and_optimizer_untouched(tmp_path, mini_root, monkeypatch):
    """The skipped update changes nothing: stop right after it and compare with the step before."""
    calls = {"n": 0}
    real_loss = MaskedAutoencoderViT.forward_loss

    def nan_at_step_3(self, imgs, pred, mask):
        calls["n"] += 1
        loss = real_loss(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] == 3 else loss

    common = [
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=10",
        "tracking.recon_every_epochs=0",
        "train.deterministic=true",
    ]
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", nan_at_step_3)
    result = pretrain(cfg_for(tmp_path, mini_root, *common, "train.max_steps=3"))
    before = ck.load_checkpoint(result.run_dir / "checkpoints" / "step_00000002")
    after = ck.load_checkpoint(result.run_dir / "checkpoints" / "step_00000003")
    assert_same_weights(before.model_state, after.model_state, atol=0)
    for a, b in zip(
        before.training_state["optimizer"]["state"].values(), after.training_state["optimizer"]["state"].values()
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    assert after.training_state["counters"]["nonfinite_skipped"] == 1


def test_unwritable_output_folder_fails_at_start(tmp_path, mini_root, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = main_in_process(capsys, f"data.root={mini_root}", f"output_dir={blocker}/runs")
    assert proc.returncode == 2
    assert "not writable" in proc.stderr and "output_dir=" in proc.stderr
    assert "step " not in proc.stdout  # nothing trained


def test_missing_data_root_is_one_clear_line(tmp_path, capsys):
    proc = main_in_process(capsys, f"output_dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.root is missing" in lines[0]


def test_wandb_offline_run_and_reconstructions(tmp_path, mini_root):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_DISABLE_CODE="true")  # no login, no netrc: auto must pick offline
    proc = cli(f"data.root={mini_root}", f"output_dir={tmp_path}", "tracking.wandb=auto", "train.epochs=1", env=env)
    run_dir = tmp_path / CPU_RECIPE.stem
    assert "W&B (offline)" in proc.stdout
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert list(offline[0].glob("files/media/images/reconstructions_*.png"))  # the grid went to W&B too
    assert (run_dir / "wandb_id.txt").is_file() and (run_dir / "metrics.jsonl").is_file()


@pytest.mark.parametrize("pipeline", ["memory", "device_decode"])
def test_fast_data_pipelines_train_and_resume_exactly(tmp_path, mini_root, pipeline):
    """The on-device data paths run the same loop, learn, and resume to the same weights."""
    common = [
        "train.epochs=2",
        "train.deterministic=true",
        f"data.pipeline={pipeline}",
        "tracking.recon_every_epochs=0",
        "checkpoint.every_steps=100",
    ]
    straight = pretrain(cfg_for(tmp_path / "a", mini_root, *common))
    records = metrics(straight.run_dir)
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["size"] == 48
    reset_accelerate()
    pretrain(cfg_for(tmp_path / "b", mini_root, *common, "train.max_steps=11"))
    reset_accelerate()
    resumed = pretrain(cfg_for(tmp_path / "b", mini_root, *common))
    assert resumed.step == straight.step == 30
    assert_same_weights(final_weights(straight.run_dir), final_weights(resumed.run_dir))


def test_stage_sized_decoding_trains_and_resumes_exactly(tmp_path, mini_root):
    """data.decode_size=stage (curriculum.mode=resize): the loader crops each micro-step straight to its stage's B
    (32 / 40 / 48 here), the loop learns, a resumed run ends with the uninterrupted run's weights, and the images
    were not those of the full-size path (the weights differ from data.decode_size=crop)."""
    common = [
        "train.epochs=2",
        "train.deterministic=true",
        "curriculum.mode=resize",
        "tracking.recon_every_epochs=0",
        "checkpoint.every_steps=100",
    ]
    straight = pretrain(cfg_for(tmp_path / "a", mini_root, *common, "data.decode_size=stage"))
    records = metrics(straight.run_dir)
    assert records[-1]["loss"] < records[0]["loss"] and {r["size"] for r in records} == {32, 40, 48}
    reset_accelerate()
    pretrain(cfg_for(tmp_path / "b", mini_root, *common, "data.decode_size=stage", "train.max_steps=11"))
    reset_accelerate()
    resumed = pretrain(cfg_for(tmp_path / "b", mini_root, *common, "data.decode_size=stage"))
    assert resumed.step == straight.step == 30
    stage_w, resumed_w = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(stage_w[k], resumed_w[k]) for k in stage_w)
    reset_accelerate()
    full_w = final_weights(pretrain(cfg_for(tmp_path / "c", mini_root, *common)).run_dir)
    assert not torch.equal(full_w["patch_embed.proj.weight"], stage_w["patch_embed.proj.weight"])


def test_a_run_on_shards_is_the_run_on_the_folder_and_resumes_exactly(tmp_path, mini_root):
    """data.source=shards over the shards of the same folder: the same images in the same order and crops, so the
    same weights bit for bit; stopped and relaunched, it ends there too."""
    from mae_et.data.shards import write_shards

    write_shards(mini_root / "train", tmp_path / "shards", shard_size=50)
    common = ["train.epochs=2", "train.deterministic=true", "tracking.recon_every_epochs=0",
              "tracking.knn_every_epochs=0", "checkpoint.every_steps=100"]  # fmt: skip
    on_folder = pretrain(cfg_for(tmp_path / "folder", mini_root, *common))
    reset_accelerate()
    shards = ["data.source=shards", f"data.shard_cache={tmp_path / 'cache'}"]
    pretrain(cfg_for(tmp_path / "shards_run", tmp_path / "shards", *common, *shards, "train.max_steps=7"))
    reset_accelerate()
    on_shards = pretrain(cfg_for(tmp_path / "shards_run", tmp_path / "shards", *common, *shards))
    assert on_shards.step == on_folder.step == 30
    a, b = final_weights(on_folder.run_dir), final_weights(on_shards.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_memory_pipeline_skips_and_counts_bad_files(tmp_path, mini_root):
    data = tmp_path / "data"
    n_bad = make_bad_folder(data)
    with pytest.warns(UserWarning):
        result = pretrain(
            cfg_for(tmp_path, data, "train.epochs=1", "data.pipeline=memory", "tracking.recon_every_epochs=0")
        )
    assert metrics(result.run_dir)[-1]["data_skipped_files"] == n_bad


TWO_STEPS = ["train.max_steps=2", "tracking.recon_every_epochs=0", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, mini_root) -> Path:
    """The output folder of a 2-step run (its checkpoint step_00000002), copied by each test that resumes it."""
    out = tmp_path_factory.mktemp("two_steps")
    with in_process_run():
        pretrain(cfg_for(out, mini_root, *TWO_STEPS))
    return out


@pytest.mark.parametrize("change", ["model.size=tiny", "model.decoder_embed_dim=48"])
def test_resume_with_a_changed_model_is_one_line_not_a_traceback(tmp_path, mini_root, change, two_step_run, capsys):
    shutil.copytree(two_step_run, tmp_path, dirs_exist_ok=True)  # the run folder's lock is free: no process holds it
    args = [f"data.root={mini_root}", f"output_dir={tmp_path}", *TWO_STEPS]
    proc = main_in_process(capsys, *args, change, "train.max_steps=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    key = change.split("=")[0]
    assert "cannot resume from" in line and "step_00000002" in line and key in line
    assert "shapes: " in line and " vs model (" in line  # the weights that differ, with both shapes
    assert "new output_dir" in line and "checkpoint.resume=false" in line
    # nothing was lost: the checkpoint is still there, and the same command without the change resumes from it
    assert [p.name for p in ck.list_checkpoints(tmp_path / CPU_RECIPE.stem / "checkpoints")] == ["step_00000002"]
    resumed = main_in_process(capsys, *args[:-2], "checkpoint.every_steps=2", "train.max_steps=4")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr


def test_checkpoint_every_epochs_0_is_off_not_every_step(tmp_path, mini_root):
    """0 means off, as everywhere in the config: only the launch's last step is saved (a gigabyte a step at ViT-B
    before)."""
    result = pretrain(
        cfg_for(
            tmp_path,
            mini_root,
            "checkpoint.every_epochs=0",
            "checkpoint.keep_last=100",
            "train.max_steps=20",
            "tracking.recon_every_epochs=0",
        )
    )
    assert [p.name for p in ck.list_checkpoints(result.run_dir / "checkpoints")] == ["step_00000020"]


# ----------------------------------------------------------------------------- the run folder: start over, layout

RUN_LINE = re.compile(
    r"interrupted (at step \d+ of \d+|before the first step); (the last checkpoint is .+ \(step \d+\)|no "
    r"checkpoint was written yet); relaunch the same command to resume"
)


def test_starting_over_moves_the_earlier_run_aside_and_the_two_never_mix(tmp_path, mini_root, two_step_run, capsys):
    """checkpoint.resume=false in a folder whose run is ahead of the new one (step 2 against step 1): the earlier
    run moves to RUN/old-1 whole, said in one line; keep_last never deletes the new run's checkpoints, the stop
    line names one that exists, and a relaunch resumes the new run."""
    shutil.copytree(two_step_run, tmp_path, dirs_exist_ok=True)
    run_dir = tmp_path / CPU_RECIPE.stem
    common = ["tracking.recon_every_epochs=0", "checkpoint.every_steps=1", "checkpoint.keep_last=1"]
    capsys.readouterr()
    fresh = pretrain(cfg_for(tmp_path, mini_root, *common, "train.max_steps=1", "checkpoint.resume=false"))
    out = capsys.readouterr().out
    [moved] = [line for line in out.splitlines() if str(run_dir / "old-1") in line]
    assert "step 2" in moved and "checkpoint.resume=false" in moved
    assert [p.name for p in ck.list_checkpoints(run_dir / "old-1" / "checkpoints")] == ["step_00000002"]
    assert (run_dir / "old-1" / "metrics.jsonl").is_file() and (run_dir / "old-1" / "config.yaml").is_file()
    assert ck.list_checkpoints(run_dir / "checkpoints") == [fresh.checkpoint] and fresh.checkpoint.name.endswith("1")
    assert f"checkpoint: {fresh.checkpoint};" in out  # the stop line names a checkpoint that exists
    reset_accelerate()
    resumed = pretrain(cfg_for(tmp_path, mini_root, *common, "train.max_steps=2"))
    assert f"resumed from {fresh.checkpoint} at step 1" in capsys.readouterr().out and resumed.step == 2
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 2  # the new run's records only


def test_a_checkpoints_path_that_is_a_file_is_refused_before_any_step(tmp_path, mini_root):
    run_dir = tmp_path / CPU_RECIPE.stem
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("mine")
    with pytest.raises(UserError, match=r"is a file") as stopped:
        pretrain(cfg_for(tmp_path, mini_root, *TWO_STEPS))
    assert str(run_dir / "checkpoints") in str(stopped.value) and "output_dir=" in str(stopped.value)
    assert (run_dir / "checkpoints").read_text() == "mine" and not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("saved", ["model: [unclosed\n", "- a list\n- not sections\n"])
def test_a_resume_whose_saved_config_is_unusable_is_one_line(tmp_path, mini_root, two_step_run, saved):
    shutil.copytree(two_step_run, tmp_path, dirs_exist_ok=True)
    ckpt = tmp_path / CPU_RECIPE.stem / "checkpoints" / "step_00000002"
    (ckpt / ck.CONFIG_FILE).write_text(saved)
    with pytest.raises(UserError) as stopped:
        pretrain(cfg_for(tmp_path, mini_root, *TWO_STEPS[1:], "train.max_steps=3"))
    line = str(stopped.value)
    assert "\n" not in line and str(ckpt / ck.CONFIG_FILE) in line and "checkpoint.resume=false" in line
    assert ck.list_checkpoints(ckpt.parent) == [ckpt]  # nothing trained, nothing removed


def test_an_output_dir_inside_the_data_is_refused_before_any_work(tmp_path):
    data = tmp_path / "data"
    copy_mini_classes(data / "train", 2)
    for inside in (data / "train", data):
        with pytest.raises(UserError, match=r"overlaps .*which this command reads"):
            pretrain(cfg_for(inside, data, *TWO_STEPS))
    assert sorted(p.name for p in data.iterdir()) == ["train"] and len(list((data / "train").iterdir())) == 2


def test_wandb_online_without_a_login_is_one_line_before_the_run_folder(tmp_path, mini_root, monkeypatch):
    pytest.importorskip("wandb")
    for key in [k for k in os.environ if k.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no login
    with pytest.raises(UserError, match=r"tracking.wandb=online needs a W&B login.*tracking.wandb=offline"):
        pretrain(cfg_for(tmp_path / "runs", mini_root, *TWO_STEPS, "tracking.wandb=online"))
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- kills and Ctrl-C


def test_a_killed_run_s_loader_workers_never_hold_its_run_folder(tmp_path, mini_root):
    """kill -9 leaves the DataLoader workers alive for a few seconds (until they notice their parent is gone):
    they must not hold the run folder's lock, so the relaunch at once takes it."""
    run_dir = tmp_path / CPU_RECIPE.stem
    cmd = [sys.executable, str(REPO / "pretrain.py"), "--config", str(CPU_RECIPE), f"data.root={mini_root}",
           *STRAIGHT, "data.num_workers=2", f"output_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD_ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not ck.list_checkpoints(run_dir / "checkpoints"):
        time.sleep(0.02)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        RunFolderLock(run_dir).acquire().release()  # what a relaunch does first
    finally:
        alive = [w for w in workers if Path(f"/proc/{w}").exists()]
        for w in alive:
            os.kill(int(w), signal.SIGKILL)
    assert alive, "the workers were gone before the relaunch; the test proves nothing"


class _SigintOnFinalize:
    """An object whose finaliser gets Ctrl-C: Python discards what a __del__ raises ('Exception ignored in')."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        len("the handler runs here, inside the finaliser")


@pytest.mark.usefixtures("one_thread_fresh_accelerate")
def test_a_ctrl_c_that_python_discards_still_stops_the_run(tmp_path, mini_root, monkeypatch):
    """A SIGINT whose KeyboardInterrupt is raised inside a finaliser (a library's __del__, a generator being
    closed) is discarded by Python; the run still stops at its next step, in its one line."""
    from mae_et.train import pretrain as loop

    noise = loop.mask_noise

    def mask_noise(seed, step, *args):
        if step == 2:
            _SigintOnFinalize()  # made and dropped at once
        return noise(seed, step, *args)

    monkeypatch.setattr(loop, "mask_noise", mask_noise)
    with pytest.raises(RunInterrupted) as stopped:
        pretrain(cfg_for(tmp_path, mini_root, "train.max_steps=4", "tracking.recon_every_epochs=0"))
    assert RUN_LINE.fullmatch(str(stopped.value)) and "at step 3 of 4" in str(stopped.value)


@pytest.mark.usefixtures("one_thread_fresh_accelerate")
def test_ctrl_c_at_random_moments_of_a_run_always_stops_it_in_one_line(tmp_path, mini_root):
    """SIGINT after a random number of the Python calls of a run's steps (anywhere: the data, the step, a
    checkpoint write, the log), a few times: every run stops with its one line, none goes on."""
    calls = [0]

    def cfg(i):
        return cfg_for(tmp_path / str(i), mini_root, "train.max_steps=2", "checkpoint.every_steps=1",
                       "tracking.recon_every_epochs=0")  # fmt: skip

    def profiled(count_to: int | None) -> None:
        calls[0] = 0

        def on_event(frame, event, arg):
            if event == "call" and (calls[0] or frame.f_code.co_name == "next_batch"):  # from the first step
                calls[0] += 1
                if calls[0] == count_to:
                    sys.setprofile(None)
                    os.kill(os.getpid(), signal.SIGINT)

        sys.setprofile(on_event)
        try:
            pretrain(cfg(count_to or 0))
        finally:
            sys.setprofile(None)

    profiled(None)  # one whole run: how many calls it makes
    total = calls[0]
    moments = sorted(random.Random().sample(range(1, total * 9 // 10), 4))  # the run seeds `random` itself
    for k in moments:
        reset_accelerate()
        with pytest.raises(RunInterrupted) as stopped:
            profiled(k)
        assert RUN_LINE.fullmatch(str(stopped.value)), (k, total, str(stopped.value))


# ----------------------------------------------------------------------------- several machines

# Stand-ins for Slurm's two commands, so examples/slurm/pretrain.sbatch runs here as on a cluster of
# SLURM_NNODES machines: scontrol names this host, srun starts one task per "node" with its SLURM_NODEID.
FAKE_SCONTROL = "#!/bin/bash\necho 127.0.0.1\n"
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done   # srun's own options
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def fake_slurm(tmp_path, job_id: int, restart: int = 0) -> dict:
    bin_dir = tmp_path / "fake-slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        **ONE_THREAD_ENV,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_JOB_ID": str(job_id),
        "SLURM_RESTART_COUNT": str(restart),
        "SLURM_SUBMIT_DIR": str(REPO),
        "MAIN_PORT": str(free_port()),
        "LAUNCHER": f"{sys.executable} -m accelerate.commands.launch",
    }


def test_two_machines_launched_by_the_slurm_script_train_as_one_two_process_launch(
    tmp_path, mini_root, two_process_run
):
    """examples/slurm/pretrain.sbatch, with Slurm's variables for 2 nodes and srun starting one launcher per node
    (machine ranks 0 and 1, one process each, rendezvous on localhost): equal weight checksums on both ranks and
    the same weights as one launch of two processes. A second job (a requeue: a new job id, the same command)
    resumes the run folder instead of starting over, and ends where an uninterrupted run ends."""
    args = ["--config", str(CPU_RECIPE), f"data.root={mini_root}", *TWO_PROCESSES]
    script = str(REPO / "examples" / "slurm" / "pretrain.sbatch")
    two = tmp_path / "two"
    jobs = []
    for job_id, restart, steps in ((101, 0, 3), (102, 1, 6)):  # the first job stops early, as a preempted one
        jobs.append(
            subprocess.run(
                ["bash", script, *args, f"output_dir={two}", f"train.max_steps={steps}"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=600,
                env=fake_slurm(tmp_path, job_id, restart),
            )  # fmt: skip
        )
        assert jobs[-1].returncode == 0, jobs[-1].stdout + jobs[-1].stderr
    assert "2 machines x 1 processes" in jobs[0].stdout and "2 process(es)" in jobs[0].stdout
    ckpts = two / CPU_RECIPE.stem / "checkpoints"
    assert f"resumed from {ckpts / 'step_00000003'}" in jobs[1].stdout, jobs[1].stdout
    meta = json.loads((ck.list_checkpoints(ckpts)[-1] / "meta.json").read_text())
    sums = meta["rank_weight_checksums"]
    assert meta["step"] == 6 and meta["world_size"] == 2 and len(sums) == 2 and sums[0] == sums[1]
    one_w, two_w = final_weights(two_process_run), final_weights(two / CPU_RECIPE.stem)
    assert one_w.keys() == two_w.keys() and all(torch.equal(one_w[k], two_w[k]) for k in one_w)  # bit for bit


@pytest.mark.parametrize("share_of, decoded_at_32", [("stage", 4), ("full_size", 9)])
def test_the_step_decodes_the_share_of_the_patches_the_recipe_names(tmp_path, mini_root, share_of, decoded_at_32):
    """model.decode_fraction_of reaches the training step: at the et curriculum's 32-px stage of the 48-px micro
    recipe (16 patches of 8 px, 12 masked), a quarter of the stage's patches is 4, of the full crop's 36 is 9."""
    from accelerate import Accelerator

    from mae_et.train.pretrain import plan_pretraining
    from mae_et.train.step import build_training

    cfg = cfg_for(tmp_path, mini_root, "model.decode_fraction=0.25", f"model.decode_fraction_of={share_of}")
    sched = plan_pretraining(cfg, num_images=64, world=1)
    assert 32 in {s.size for s in sched.plan.stages}
    model, _, step = build_training(cfg, Accelerator(cpu=True), sched.base_lr, (32, 40, 48))
    seen = []
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    for size in (32, 48):
        step(images, size, torch.rand(2, (size // 8) ** 2))
    assert seen == [1 + 4 + decoded_at_32, 1 + 9 + 9]  # cls + visible + decoded; the full size alike under both


# ----------------------------------------------------------------------------- continued pretraining (model.init)


def start_weights(kind: str, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A start point and the weights it holds, in our names."""
    from mae_et.models.hf import hf_to_mae

    if kind == "transformers":
        folder, _ = transformers_folder(tmp_path)
        state = hf_to_mae(load_file(str(folder / "model.safetensors")))
        return folder, {k: v for k, v in state.items() if "pos_embed" not in k}
    path, mae = official_pth(tmp_path)
    return path, mae.state_dict()


@pytest.mark.parametrize("kind", ["transformers", "official"])
def test_a_run_starts_from_the_weights_it_is_given_and_records_them(tmp_path, mini_root, kind, capsys):
    """One step at lr 0 (the warmup's first): the run holds exactly the start point's encoder and decoder; its
    config and checkpoint name the source and the hash of its weights, and its first line says so."""
    source, expected = start_weights(kind, tmp_path)
    result = pretrain(
        cfg_for(tmp_path / "runs", mini_root, f"model.init={source}", *TWO_STEPS[:1], "train.max_steps=1")
    )
    weights = final_weights(result.run_dir)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights), "the run does not hold its start point"
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["model"]
    weights_file = source / "model.safetensors" if source.is_dir() else source
    assert (
        saved["init"] == str(source) and saved["init_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    )
    checkpoint_config = yaml.safe_load(
        (ck.list_checkpoints(result.run_dir / "checkpoints")[-1] / "config.yaml").read_text()
    )
    assert checkpoint_config["model"]["init_sha256"] == saved["init_sha256"]
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"starting from {'hf' if kind == 'transformers' else 'official'} weights {weights_file}")


def test_a_start_point_lowers_the_first_losses_and_a_wrong_hash_or_size_is_one_line(tmp_path, mini_root, micro_run):
    """On the same data and steps, starting from the session's pretrained micro run gives a lower loss than a fresh
    initialisation; a start point whose hash is not the one given, or of another model size, is refused."""
    steps = ["train.max_steps=4", "tracking.recon_every_epochs=0"]
    fresh = pretrain(cfg_for(tmp_path / "fresh", mini_root, *steps)).last_metrics["loss"]
    started = pretrain(cfg_for(tmp_path / "started", mini_root, f"model.init={micro_run}", *steps)).last_metrics["loss"]
    assert started < fresh - 0.05, (started, fresh)
    with pytest.raises(StartPointError, match="not the model.init_sha256"):
        pretrain(cfg_for(tmp_path / "pinned", mini_root, f"model.init={micro_run}", "model.init_sha256=abc", *steps))
    with pytest.raises(StartPointError, match="does not fit this run's model") as e:
        pretrain(cfg_for(tmp_path / "tiny", mini_root, f"model.init={micro_run}", "model.size=tiny", *steps))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pinned").exists() and not (tmp_path / "tiny").exists()  # nothing left behind
