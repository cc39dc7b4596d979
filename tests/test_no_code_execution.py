"""No loader runs code from a file (issue 12).

A payload whose unpickling creates a marker file is planted in every kind of file a loader reads:
an official-format MAE .pth, a timm-style .pth, a run folder's training_state.pt (pretraining
resume, fine-tune / probe states) and the run folders the visualize CLI reads. Each test asserts
the marker was not created and, where the file is refused, that the one-line error names the file
and says why. The control test shows the payload does create the marker under a full unpickle, so
an absent marker means the code did not run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch
from helpers import CPU_RECIPE, call_main, in_process_run

from mae_et import checkpoint as ck
from mae_et.evaluate.finetune import layer_decay_param_groups
from mae_et.evaluate.lars import LARS
from mae_et.evaluate.visualize import main as visualize_main
from mae_et.models.mae import get_2d_sincos_pos_embed, mae_vit
from mae_et.models.start import load_official_mae_checkpoint
from mae_et.models.vit import EncoderSpec, LoadError, build_vit, load_encoder_state, load_pretrained_vit
from mae_et.train.config import load_pretrain_config
from mae_et.train.pretrain import pretrain

MICRO = EncoderSpec(size="micro", patch_size=8, img_size=48)  # the CPU recipe's encoder
HOWS = ("open", "system")  # two payloads: a builtin that creates a file, and a shell command
REFUSED_GLOBAL = r"\((?:[\w.]*\.)?(?:open|system)\)"  # the refused global, named in the message


class Payload:
    """Unpickles as a call that creates `marker`: if a loader ran it, the marker exists."""

    def __init__(self, marker: Path, how: str = "open") -> None:
        self.marker, self.how = Path(marker), how

    def __reduce__(self):
        if self.how == "open":
            return (open, (str(self.marker), "w"))
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def assert_refused(message: str, path: Path) -> None:
    assert len(message.splitlines()) == 1, message
    assert f"'{path}' refused: it holds Python objects that could run code when loaded" in message, message
    assert re.search(REFUSED_GLOBAL, message), message
    assert "trust" not in message  # the fix is what to do with the file, not "trust it"


def micro_mae(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mae_vit("micro", patch_size=8, img_size=48, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def official_sd(mae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's names, with the fixed sin-cos tables official files carry."""
    sd = dict(mae.state_dict())
    sd["pos_embed"] = get_2d_sincos_pos_embed(64, 6).unsqueeze(0)  # (1, 37, 64)
    sd["decoder_pos_embed"] = get_2d_sincos_pos_embed(32, 6).unsqueeze(0)  # (1, 37, 32)
    return sd


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mini_root) -> Path:
    """A real pretraining run stopped after 2 steps, a checkpoint at each (in-process, a few seconds)."""
    out = tmp_path_factory.mktemp("no_code_run")
    with in_process_run():
        cfg = load_pretrain_config(
            CPU_RECIPE,
            [
                f"data.root={mini_root}",
                f"output_dir={out}",
                "train.epochs=1",
                "train.max_steps=2",
                "checkpoint.every_steps=1",
                "checkpoint.keep_last=3",
            ],
        )
        run = pretrain(cfg).run_dir
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == ["step_00000001", "step_00000002"]
    return run


def poisoned_copy(run: Path, dest: Path, marker: Path, how: str = "open") -> tuple[Path, Path]:
    """A copy of `run` whose latest training_state.pt holds its real state plus a payload; (copy, that file)."""
    copy = shutil.copytree(run, dest)
    state_file = ck.list_checkpoints(copy / "checkpoints")[-1] / ck.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state["counters"]["note"] = Payload(marker, how)  # hidden deep inside otherwise real data
    torch.save(state, state_file)
    return copy, state_file


# ----------------------------------------------------------------------------- the payload works
@pytest.mark.parametrize("how", HOWS)
def test_payload_runs_under_a_full_unpickle(tmp_path, how):
    """The control: loading without weights_only runs the payload, so an absent marker below means a refusal."""
    marker = tmp_path / "PWNED"
    torch.save({"model": {"w": torch.zeros(1)}, "args": Payload(marker, how)}, tmp_path / "x.pth")
    obj = torch.load(tmp_path / "x.pth", weights_only=False)
    if how == "open":
        obj["args"].close()
    assert marker.exists()


# ----------------------------------------------------------------------------- (a) official MAE .pth
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("where", ["args", "namespace", "state_dict"])
def test_official_loader_refuses_a_planted_payload(tmp_path, how, where):
    marker = tmp_path / "PWNED"
    sd = official_sd(micro_mae())
    payload = Payload(marker, how)
    if where == "args":
        obj = {"model": sd, "epoch": 3, "args": payload}
    elif where == "namespace":  # the allow-listed Namespace does not let what it holds through
        obj = {"model": sd, "args": argparse.Namespace(model="mae_vit_micro", hook=payload)}
    else:
        obj = {"model": {**sd, "extra": payload}}
    path = tmp_path / "mae_visualize_vit_micro.pth"
    torch.save(obj, path)
    model = micro_mae(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_official_mae_checkpoint(model, path)
    assert not marker.exists()
    assert_refused(str(info.value), path)
    assert "re-save its state_dict as .safetensors or a plain tensor dict" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded


def test_official_file_with_its_namespace_still_loads(tmp_path):
    mae = micro_mae(seed=2)
    path = tmp_path / "mae_visualize_vit_micro.pth"
    # the reference's training checkpoints: weights, epoch, and the argparse.Namespace of the run
    torch.save(
        {"model": official_sd(mae), "epoch": 3, "args": argparse.Namespace(model="mae_vit_micro", lr=1e-3)}, path
    )
    model = micro_mae(seed=3)
    load_official_mae_checkpoint(model, path)
    assert all(torch.equal(v, mae.state_dict()[k]) for k, v in model.state_dict().items())


def test_official_loader_keeps_errors_of_a_corrupt_file(tmp_path):
    """A truncated file is not called malicious: its error does not say refused."""
    path = tmp_path / "broken.pth"
    torch.save({"model": official_sd(micro_mae())}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(Exception) as info:
        load_official_mae_checkpoint(micro_mae(), path)
    assert "refused" not in str(info.value)


# ----------------------------------------------------------------------------- (b) timm-style .pth
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("wrapper", ["bare", "state_dict"])
def test_timm_loader_refuses_a_planted_payload(tmp_path, how, wrapper):
    marker = tmp_path / "PWNED"
    torch.manual_seed(0)
    sd = timm.models.vision_transformer.VisionTransformer(
        img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10
    ).state_dict()
    sd["blocks.0.attn.qkv.weight_hook"] = Payload(marker, how)
    path = tmp_path / "vit_micro.pth"
    torch.save(sd if wrapper == "bare" else {"state_dict": sd, "epoch": 1}, path)
    for load in (load_encoder_state, lambda p: load_pretrained_vit(p, num_classes=4)):
        with pytest.raises(LoadError) as info:
            load(path)
        assert not marker.exists()
        assert_refused(str(info.value), path)
        assert "re-save its state_dict as .safetensors or a plain tensor dict" in str(info.value)


def test_eval_loader_reads_no_pickle_from_a_run_folder(tiny_run, tmp_path):
    """A run folder given to the fine-tune / probe loader: only model.safetensors and config.yaml are read."""
    marker = tmp_path / "PWNED"
    run, _ = poisoned_copy(tiny_run, tmp_path / "run", marker)
    state, spec, kind = load_encoder_state(run)
    assert (spec, kind) == (MICRO, "mae_et") and state
    vit, _ = load_pretrained_vit(run, num_classes=4)
    # a config.yaml with a YAML python tag: safe_load refuses the tag, in one line
    config = ck.list_checkpoints(run / "checkpoints")[-1] / ck.CONFIG_FILE
    config.write_text(f'hook: !!python/object/apply:os.system ["touch {marker}"]\n' + config.read_text())
    with pytest.raises(LoadError) as info:
        load_encoder_state(run)
    assert len(str(info.value).splitlines()) == 1 and str(config) in str(info.value), str(info.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- (c) run folder: resume
def test_real_training_state_loads_with_weights_only(tiny_run):
    """What a pretraining run saves (optimizer, scaler, counters, clocks, RNG) passes the weights-only load."""
    found = ck.load_latest_checkpoint(tiny_run / "checkpoints")
    assert found is not None and found.path.name == "step_00000002"
    state = found.training_state
    assert {"optimizer", "scaler", "step", "counters", "rng", "elapsed_seconds", "cpu_seconds"} <= set(state)
    assert state["step"] == 2 and isinstance(state["rng"]["torch_cpu"], torch.Tensor)
    rng = torch.get_rng_state()
    try:
        torch.set_rng_state(state["rng"]["torch_cpu"])  # what the resume does with it
    finally:
        torch.set_rng_state(rng)


def test_finetune_and_probe_states_load_with_weights_only(tmp_path):
    """The fine-tune (layer-decay AdamW, grad scaler, best) and probe (LARS, best) states round-trip."""
    vit = build_vit(MICRO, num_classes=4, global_pool="avg")
    adamw = torch.optim.AdamW(layer_decay_param_groups(vit, 0.05, 0.75), lr=1e-3, betas=(0.9, 0.999))
    head = torch.nn.Linear(64, 4)
    lars = LARS(head.parameters(), lr=0.1, weight_decay=0.0, momentum=0.9)
    for opt, model in ((adamw, vit), (lars, head)):
        x = torch.randn(2, 3, 48, 48) if model is vit else torch.randn(2, 64)
        model(x).sum().backward()
        opt.step()
    scaler = torch.amp.GradScaler("cpu")
    best = {"top1": 51.5, "top5": 90.0, "epoch": 3, "step": 40}
    states = {
        "finetune": {
            "optimizer": adamw.state_dict(),
            "scaler": scaler.state_dict(),
            "step": 40,
            "elapsed_seconds": 12.5,
            "best": best,
        },
        "linprobe": {"optimizer": lars.state_dict(), "step": 40, "best": best},
        "best": {"step": 40, "epoch": 3},  # what finetune_engine.save_best writes
    }
    for name, state in states.items():
        root = tmp_path / name
        ck.save_checkpoint(root, 40, head.state_dict(), state, "model: {}\n", {"step": 40}, keep_last=1)
        found = ck.load_latest_checkpoint(root)
        assert found is not None and found.training_state.keys() == state.keys(), name
    found = ck.load_latest_checkpoint(tmp_path / "finetune")
    fresh = torch.optim.AdamW(layer_decay_param_groups(vit, 0.05, 0.75), lr=1e-3)
    fresh.load_state_dict(found.training_state["optimizer"])  # what resume_latest does
    assert found.training_state["best"] == best


@pytest.mark.parametrize("how", HOWS)
def test_poisoned_training_state_is_refused_without_falling_back(tiny_run, tmp_path, how):
    marker = tmp_path / "PWNED"
    run, state_file = poisoned_copy(tiny_run, tmp_path / "run", marker, how)
    with pytest.raises(ck.RefusedFileError) as info:
        ck.load_checkpoint(state_file.parent)
    assert not marker.exists()
    assert_refused(str(info.value), state_file)
    assert "delete that checkpoint folder to resume from an earlier one" in str(info.value)
    # the latest one is refused: the resume stops there rather than quietly using step 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "trying the previous checkpoint" warning
        with pytest.raises(ck.RefusedFileError) as info:
            ck.load_latest_checkpoint(run / "checkpoints")
    assert not marker.exists()
    assert_refused(str(info.value), state_file)
    assert isinstance(info.value, ck.CheckpointError)  # the CLIs' one-line user error
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == ["step_00000001", "step_00000002"]


def test_a_corrupt_latest_checkpoint_still_falls_back(tiny_run, tmp_path):
    """Unchanged: a truncated (not refused) state is reported and the previous checkpoint used."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    state_file = ck.list_checkpoints(run / "checkpoints")[-1] / ck.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"step_00000002' is unreadable .*trying the previous checkpoint") as rec:
        found = ck.load_latest_checkpoint(run / "checkpoints")
    assert found is not None and found.path.name == "step_00000001"
    assert all(len(str(w.message).splitlines()) == 1 for w in rec)


def test_pretraining_resume_refuses_a_poisoned_run(tiny_run, tmp_path, mini_root):
    """Relaunching pretraining on a shared run folder with a planted payload: refused, nothing written."""
    marker = tmp_path / "PWNED"
    run, state_file = poisoned_copy(tiny_run, tmp_path / "run", marker)
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    with in_process_run():
        cfg = load_pretrain_config(
            CPU_RECIPE,
            [
                f"data.root={mini_root}",
                f"output_dir={run.parent}",
                f"name={run.name}",
                "train.epochs=1",
                "train.max_steps=3",
                "checkpoint.every_steps=1",
                "checkpoint.keep_last=3",
            ],
        )
        assert cfg.run_dir == run
        with pytest.raises(ck.RefusedFileError) as info:
            pretrain(cfg)
    assert not marker.exists()
    assert_refused(str(info.value), state_file)
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == ["step_00000001", "step_00000002"]
    assert not any(p.name.startswith(ck.TMP_PREFIX) for p in (run / "checkpoints").iterdir())
    assert before == {
        p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")
    }  # nothing added, removed or rewritten


# ----------------------------------------------------------------------------- (d) the visualize CLI
def two_images(mini_root: Path) -> list[str]:
    return [str(p) for p in sorted((mini_root / "val").rglob("*.JPEG"))[:2]]


def test_visualize_cli_reads_no_pickle_from_a_poisoned_run(tiny_run, tmp_path, mini_root, capsys):
    """`python -m mae_et.evaluate.visualize RUN` (its main, in this process: a payload that ran would make the
    marker here as well): the planted training_state.pt is never unpickled."""
    marker = tmp_path / "PWNED"
    run, _ = poisoned_copy(tiny_run, tmp_path / "run", marker, "system")
    out = tmp_path / "grid.png"
    proc = call_main(visualize_main, [str(run), *two_images(mini_root), "--out", str(out)], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and not marker.exists()


def test_visualize_refuses_a_pickle_posing_as_weights_or_a_yaml_payload(tiny_run, tmp_path, mini_root, capsys):
    marker = tmp_path / "PWNED"
    imgs = two_images(mini_root)
    # model.safetensors replaced by a torch pickle carrying a payload: unreadable, not run
    run = shutil.copytree(tiny_run, tmp_path / "run_weights")
    latest = ck.list_checkpoints(run / "checkpoints")[-1]
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, latest / ck.MODEL_FILE)
    with pytest.raises(SystemExit) as info:
        visualize_main([str(run), *imgs, "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and ck.MODEL_FILE in err, err
    # config.yaml with a YAML python tag: safe_load refuses the tag
    run = shutil.copytree(tiny_run, tmp_path / "run_yaml")
    latest = ck.list_checkpoints(run / "checkpoints")[-1]
    config = latest / ck.CONFIG_FILE
    config.write_text(f'hook: !!python/object/apply:os.system ["touch {marker}"]\n' + config.read_text())
    with pytest.raises(SystemExit) as info:
        visualize_main([str(run), *imgs, "--out", str(tmp_path / "b.png")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and ck.CONFIG_FILE in err, err
    assert not marker.exists()
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
