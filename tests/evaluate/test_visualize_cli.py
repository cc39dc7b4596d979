"""`python -m mae_et.evaluate.visualize`: a PNG grid of the expected size from a real checkpoint, one-line
user errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import CPU_RECIPE, REPO, in_process_run
from PIL import Image

from mae_et import checkpoint as ck
from mae_et.evaluate.visualize import load_mae, main
from mae_et.train.config import load_pretrain_config
from mae_et.train.pretrain import pretrain

CROP, PATCH, PADDING = 48, 8, 2  # the CPU recipe's crop and patch; make_grid's padding


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mini_root) -> Path:
    """A real run stopped after one step (in-process, a few seconds): a checkpoint in our format."""
    out = tmp_path_factory.mktemp("visualize_run")
    with in_process_run():
        cfg = load_pretrain_config(
            CPU_RECIPE, [f"data.root={mini_root}", f"output_dir={out}", "train.epochs=1", "train.max_steps=1"]
        )
        return pretrain(cfg).run_dir


def visualize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mae_et.evaluate.visualize", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def two_images(mini_root: Path) -> list[str]:
    return [str(p) for p in sorted((mini_root / "val").rglob("*.JPEG"))[:2]]


def titled_figure_parts(path: Path, side: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(title strip, grid) of a reconstruction figure of `rows` images at side `side`, checked on the way: at least 800
    pixels wide, the 4-panel grid enlarged by a whole factor with nearest-neighbour (every block one colour)."""
    grid_w, grid_h = 4 * (side + PADDING) + PADDING, rows * (side + PADDING) + PADDING  # make_grid's layout
    image = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
    height, width, _ = image.shape
    scale = width // grid_w
    assert width == scale * grid_w and width >= 800 and height > scale * grid_h, (image.shape, grid_w, grid_h)
    strip, grid = image[: height - scale * grid_h], image[height - scale * grid_h :]
    blocks = grid.reshape(grid_h, scale, grid_w, scale, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    return strip, grid


def titles_drawn(strip: np.ndarray) -> list[int]:
    """Dark pixels over each of the 4 columns of a figure's white title strip (a blank strip has none)."""
    ink = (strip < 128).any(axis=-1)  # (h, W)
    return [int(column.sum()) for column in np.array_split(ink, 4, axis=1)]


@pytest.mark.parametrize("size", [None, 32])
def test_cli_writes_a_titled_figure_large_enough_to_see(tmp_path, tiny_run, mini_root, size, capsys):
    out = tmp_path / "grid.png"
    # main() in-process: the same code as `python -m mae_et.evaluate.visualize`, without a second torch import
    main([str(tiny_run), *two_images(mini_root), "--out", str(out), *([] if size is None else ["--size", str(size)])])
    assert f"wrote {out}: 2 images" in capsys.readouterr().out
    # 2 rows of 4 panels of 48 or 32 px, 202 or 138 px wide: enlarged 4 or 6 times, under the column titles
    strip, _ = titled_figure_parts(out, CROP if size is None else size, rows=2)
    assert (strip == 255).all(axis=-1).mean() > 0.5  # a white strip ...
    assert min(titles_drawn(strip)) > 50, titles_drawn(strip)  # ... with a title over every column


def test_bad_checkpoint_path_exits_2_with_one_line(tmp_path, mini_root):
    # a real process: the exit status and everything on stderr are what the user sees
    proc = visualize(str(tmp_path / "nowhere"), *two_images(mini_root), "--out", str(tmp_path / "grid.png"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0], proc.stderr
    assert not (tmp_path / "grid.png").exists()


def test_load_mae_takes_a_run_or_a_checkpoint_and_rejects_other_folders(tiny_run, tmp_path):
    latest = ck.list_checkpoints(tiny_run / "checkpoints")[-1]
    model, cfg = load_mae(tiny_run)
    assert not model.training and cfg.data.crop_size == CROP and model.patch_size == PATCH
    model2, _ = load_mae(latest)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    with pytest.raises(ck.CheckpointError, match="is not a checkpoint"):
        load_mae(tmp_path)
    # strict: weights that do not fit the config's model are refused, in one line
    wrong = tmp_path / "step_00000001"
    shutil.copytree(latest, wrong)
    config = wrong / ck.CONFIG_FILE
    config.write_text(config.read_text().replace("decoder_depth: 1", "decoder_depth: 2"))
    with pytest.raises(
        ck.CheckpointError, match="does not match its config's model: not in the checkpoint: decoder_blocks.1"
    ):
        load_mae(wrong)


def test_out_is_checked_before_the_work_and_never_replaced_unasked(tmp_path, tiny_run, mini_root, capsys, monkeypatch):
    called = []
    monkeypatch.setattr("mae_et.evaluate.visualize.load_mae", lambda *a: called.append(1))
    ckpt = ck.list_checkpoints(tiny_run / "checkpoints")[-1]
    existing = tmp_path / "grid.png"
    existing.write_bytes(b"old")
    for out, message in (
        (ckpt / "grid.png", "which this command reads"),
        (tiny_run / "checkpoints" / "g.png", "inside"),
        (mini_root / "val" / "grid.png", "which this command reads"),
        (tmp_path / "grid.jpg", "must end with .png"),
        (existing, "exists; pass --overwrite to replace it"),
    ):
        with pytest.raises(SystemExit) as e:
            main([str(tiny_run), str(mini_root / "val"), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: --out") and message in err and err.count("\n") == 1, err
    assert not called and existing.read_bytes() == b"old"
    monkeypatch.undo()
    main([str(tiny_run), *two_images(mini_root), "--out", str(existing), "--overwrite"])
    assert Image.open(existing).format == "PNG" and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def decompression_bomb(path: Path) -> Path:
    """A PNG whose header says 20000 x 20000 pixels (Pillow refuses to decode more than twice its limit)."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # the signature, then IHDR's length and type; its width and height come first
    data[ihdr : ihdr + 8] = struct.pack(">II", 20000, 20000)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def test_a_decompression_bomb_ends_in_one_line(tmp_path, tiny_run, mini_root, capsys):
    bomb = decompression_bomb(tmp_path / "bomb.png")
    with pytest.raises(SystemExit) as e:
        main([str(tiny_run), two_images(mini_root)[0], str(bomb), "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and str(bomb) in err and "DecompressionBomb" in err, err
    assert not (tmp_path / "grid.png").exists()


def test_a_fine_tuning_run_is_told_it_is_no_pretraining_run(tmp_path):
    from mae_et.evaluate.config import FinetuneConfig
    from mae_et.recipes import save_config

    cfg = FinetuneConfig()
    cfg.model.checkpoint = "runs/the_pretraining"
    save_config(cfg, tmp_path / "config.yaml")
    ck.save_checkpoint(
        tmp_path / "run" / "checkpoints", 5, {}, {}, (tmp_path / "config.yaml").read_text(), {"step": 5}, 1
    )
    with pytest.raises(ck.CheckpointError, match="is a fine-tuned classifier, not a pretrained encoder"):
        load_mae(tmp_path / "run")
