"""python -m mae_et.evaluate.export: the encoder as a timm-loadable .safetensors file, equal features in timm, bad
input in one line, never over what it reads."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest
import timm
import torch
from helpers import (
    MOUNT,
    REPO,
    mains_command,
    namespace_prefix,
    plain_user_prefix,
    random_mae,
    save_as_our_checkpoint,
    split_mains,
)
from safetensors.torch import load_file

from mae_et.checkpoint import list_checkpoints
from mae_et.evaluate.export import export_encoder
from mae_et.evaluate.export import main as export_main
from mae_et.models.vit import EncoderSpec, load_encoder_state, load_pretrained_vit


def test_export_tiny_loads_in_timm_with_equal_features(tmp_path, capsys):
    mae = random_mae("tiny", 16, 224)
    save_as_our_checkpoint(mae, tmp_path / "run", "tiny", 16, 224, tmp_path)
    out = tmp_path / "tiny.safetensors"
    assert export_main([str(tmp_path / "run"), str(out)]) == 0
    printed = capsys.readouterr().out
    line = (
        f'timm.create_model("vit_tiny_patch16_224", pretrained=True, '
        f'pretrained_cfg_overlay=dict(file="{out.resolve()}", num_classes=0))'
    )
    assert line in printed

    vit = eval(line, {"timm": timm}).eval()  # the printed line, as a user would paste it
    assert vit.num_classes == 0
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = mae.forward_features(x)  # (2, 197, 192)
        theirs = vit.forward_features(x)  # (2, 197, 192)
    assert theirs.shape == ours.shape == (2, 197, 192)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    # The file is the encoder only, contiguous, with the spec in its metadata.
    state, spec, kind = load_encoder_state(out)
    assert (spec, kind) == (EncoderSpec("tiny", 16, 224), "timm")
    assert set(state) == set(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict())
    assert not any(k.startswith(("decoder", "mask_token", "head")) for k in state)


def test_micro_export_prints_the_vit_kwargs(micro_run, tmp_path, capsys):
    out = tmp_path / "sub" / "micro.safetensors"
    assert export_main([str(micro_run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "VisionTransformer(img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)" in printed
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0
    )
    vit.load_state_dict(load_file(str(out)), strict=True)
    ours, _ = load_pretrained_vit(micro_run)
    for k, v in ours.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k


def test_export_cli_bad_input_exits_2(tmp_path, micro_run, capsys):
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "missing_run"), str(tmp_path / "out.safetensors")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "does not exist" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        export_main([str(micro_run), str(tmp_path / "out.pth")])
    assert e.value.code == 2 and ".safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    assert export_encoder(micro_run, tmp_path / "ok.safetensors").is_file()


def test_export_never_overwrites_what_it_reads(tmp_path, micro_run, capsys):
    """`export RUN RUN/checkpoints/step_N/model.safetensors` replaced the MAE weights with the encoder alone (the
    run could no longer resume). Refused, as is the input file itself and an existing file unless --overwrite."""
    import shutil
    import stat

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    weights = list_checkpoints(run / "checkpoints")[-1] / "model.safetensors"
    before = weights.read_bytes()
    for src, dst, message in (
        (run, weights, "lies inside"),
        (run, run / "checkpoints" / "enc.safetensors", "lies inside"),
        (weights.parent, run / "checkpoints" / "enc.safetensors", "lies inside the checkpoints"),
    ):
        with pytest.raises(SystemExit) as e:
            export_main([str(src), str(dst)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert weights.read_bytes() == before and not (run / "checkpoints" / "enc.safetensors").exists()
    out = tmp_path / "enc.safetensors"
    assert export_main([str(run), str(out)]) == 0
    with pytest.raises(SystemExit):  # a file input as its own output
        export_main([str(out), str(out), "--overwrite"])
    assert "is also an input of this command" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(run), str(out)])
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    old = os.umask(0o022)
    try:
        assert export_main([str(run), str(out), "--overwrite"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # the umask's mode, not safetensors' 0600
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def run_with_two_checkpoints(tmp_path):
    """A run folder of a micro MAE with checkpoints at steps 7 and 9 of different weights; (run, the step 9 MAE)."""
    from mae_et.checkpoint import save_checkpoint

    run = tmp_path / "run"
    save_as_our_checkpoint(random_mae("micro", 8, 48, seed=0), run, "micro", 8, 48, tmp_path)
    later = random_mae("micro", 8, 48, seed=1)
    config = (tmp_path / "config.yaml").read_text()
    meta = {"step": 9, "total_steps": 9, "global_batch": 16, "complete": True}  # as a run writes it
    save_checkpoint(run / "checkpoints", 9, later.state_dict(), {"step": 9}, config, meta, keep_last=3)
    return run, later


def test_an_export_into_the_run_it_reads_is_refused_and_a_file_there_never_changes_which_weights_it_gives(
    tmp_path, capsys
):
    """`export RUN RUN/model.safetensors` was accepted, and then `export RUN` gave those weights (step 7's) instead of
    the latest checkpoint's (step 9's)."""
    run, later = run_with_two_checkpoints(tmp_path)
    with pytest.raises(SystemExit) as e:
        export_main([str(run), str(run / "model.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "which this command reads" in err, err
    assert not (run / "model.safetensors").exists()
    # a file of that name put there another way (an export of an older step): the run still means its latest step
    step7 = list_checkpoints(run / "checkpoints")[0]
    assert export_main([str(step7), str(run / "model.safetensors")]) == 0
    assert export_main([str(run), str(tmp_path / "latest.safetensors")]) == 0
    exported = load_file(str(tmp_path / "latest.safetensors"))
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], later.state_dict()["blocks.0.attn.qkv.weight"])
    state, _, _ = load_encoder_state(run / "model.safetensors")  # the file itself, when named, is that file
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], later.state_dict()["blocks.0.attn.qkv.weight"])


def test_a_full_disk_ends_both_exports_in_one_line_and_leaves_no_file(tmp_path):
    """A micro encoder (about 450 KB) into a 100 KB tmpfs, as timm weights and as a transformers folder (both
    exports in one process inside the mount namespace)."""
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs root or unprivileged user namespaces)")
    run, _ = run_with_two_checkpoints(tmp_path)
    disk = tmp_path / "small"
    disk.mkdir()
    exports = mains_command(
        "mae_et.evaluate.export",
        [[str(run), str(disk / "enc.safetensors")], [str(run), str(disk / "hf"), "--format", "hf"]],
    )
    script = " ; ".join(
        [
            MOUNT.format(size="100k", dir=shlex.quote(str(disk))),
            shlex.join(exports),
            f"find {shlex.quote(str(disk))} -mindepth 1",
        ]
    )
    proc = subprocess.run([*prefix, "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    timm_file, hf_folder = split_mains(proc.stdout, proc.stderr)
    for export, target in ((timm_file, disk / "enc.safetensors"), (hf_folder, disk / "hf")):
        assert export.returncode == 2 and export.stderr == (
            f"error: no space left on device while writing '{target}'; nothing half-written was left: "
            "free some space and run the same command again\n"
        ), export.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith(str(disk))] == []


def test_weights_this_user_may_not_read_are_said_so_in_one_line(tmp_path):
    """As a user who is not root: not 'unreadable (No such file or directory); delete that checkpoint folder'."""
    prefix = plain_user_prefix(tmp_path)
    if prefix is None:
        pytest.skip("cannot run as a user whom file permissions bind (setpriv missing or not allowed)")
    run, _ = run_with_two_checkpoints(tmp_path)
    locked = list_checkpoints(run / "checkpoints")[-1] / "model.safetensors"
    locked.chmod(0)
    try:
        exports = mains_command(
            "mae_et.evaluate.export", [[str(src), str(tmp_path / "e.safetensors")] for src in (run, locked)]
        )
        proc = subprocess.run([*prefix, *exports], cwd=REPO, capture_output=True, text=True, timeout=300)
        exported = split_mains(proc.stdout, proc.stderr)
        assert len(exported) == 2, proc.stdout + proc.stderr
        for export in exported:  # the run folder, then the file itself
            assert export.returncode == 2 and export.stderr == (
                f"error: '{locked}' cannot be read (Permission denied); give this user read access\n"
            ), export.stderr
    finally:
        locked.chmod(0o644)
