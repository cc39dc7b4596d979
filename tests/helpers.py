"""Helpers the tests share, imported as a module (`from helpers import ...`; pyproject's pytest pythonpath puts
tests/ on sys.path): paths to the checkout, the mini data set and the CPU recipe, the one-thread environment, the
Accelerate reset, the mini set with broken files planted, a benchmark module by name, an independent FLOP count,
faults (a small full disk, file permissions that hold, a safetensors header that lies). Fixtures built on them are in
conftest.py."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from mae_et.models.mae import get_2d_sincos_pos_embed, mae_vit
from mae_et.run.run import fresh_accelerate_state

REPO = Path(__file__).resolve().parents[1]
MINI = REPO.parent / "shared" / "data" / "imagenette-mini"
CPU_RECIPE = REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml"

# One intra-op thread for subprocess runs: on a shared 2-core machine OpenMP threads spinning
# against other jobs make the tiny ops of these runs 10-50x slower. Results do not depend on it.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def load_benchmark(name: str):
    """benchmarks/<name>.py, imported as the module benchmarks.<name> (the package the scripts import each other
    through)."""
    return importlib.import_module(f"benchmarks.{name}")


def reset_accelerate() -> None:
    """Forget this process's Accelerate state: each in-process run builds its own Accelerator (precision and
    tracker may differ), so a test that runs twice in one process resets between the runs."""
    fresh_accelerate_state()


@contextmanager
def in_process_run():
    """One intra-op thread (see ONE_THREAD_ENV) and a fresh Accelerate state around an in-process run; also
    for module- and session-scoped fixtures, which cannot take a function-scoped fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    try:
        yield
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)


def call_main(main, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """An entry point's main(argv) in this process (one thread, a fresh Accelerate state), as its command would run
    it: its exit status (a SystemExit's code, else 0), stdout and stderr (read through pytest's capsys), without the
    seconds a new interpreter spends importing. For the behaviour past the command line; where what the shell sees
    is the behaviour, the tests run the command itself."""
    capsys.readouterr()
    try:
        with in_process_run():
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


# ----------------------------------------------------------------------------- the mini set plus broken files


def copy_mini_classes(dst: Path, n_classes: int, n_images: int | None = None) -> list[Path]:
    """The first `n_classes` class folders of imagenette-mini's train split (their first `n_images` JPEGs, or
    all) copied under `dst`; returns the new class folders."""
    out = []
    for cls in sorted(p for p in (MINI / "train").iterdir() if p.is_dir())[:n_classes]:
        (dst / cls.name).mkdir(parents=True)
        for src in sorted(cls.glob("*.JPEG"))[:n_images]:
            shutil.copy(src, dst / cls.name / src.name)
        out.append(dst / cls.name)
    return out


def first_jpeg() -> bytes:
    return sorted((MINI / "train").glob("*/*.JPEG"))[0].read_bytes()


def jpeg_whose_scan_is_broken(real: bytes) -> bytes:
    """A real JPEG's headers up to its frame header (8-bit, 3 components: a header check passes), then a scan
    of garbage: every decoder fails on it."""
    pos = 2
    while real[pos + 1] not in (0xC0, 0xC1, 0xC2):  # walk the marker segments to the frame header
        pos += 2 + ((real[pos + 2] << 8) | real[pos + 3])
    frame_end = pos + 2 + ((real[pos + 2] << 8) | real[pos + 3])
    return real[:frame_end] + b"\xff\xda\x00\x08" + b"\x07" * 300 + b"\xff\xd9"


# Every kind of broken file the tests plant, by name: what it is, and where the pipeline must catch it.
BROKEN_FILES = {
    "zero.JPEG": (lambda real: b"", "empty: skipped at the scan"),
    "notes.txt": (lambda real: b"not an image", "not an image name: skipped at the scan"),
    "truncated.JPEG": (lambda real: real[: len(real) // 3], "a third of a real JPEG: fails to decode"),
    "fake.jpg": (lambda real: b"this is text with an image extension", "text with an image name: fails to decode"),
    "corrupt.JPEG": (
        lambda real: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "a JPEG start marker, then noise: fails the header check and decoding",
    ),
    "headers_fine_scan_broken.JPEG": (jpeg_whose_scan_is_broken, "passes the header check, fails to decode"),
}
SKIPPED_AT_SCAN = ("zero.JPEG", "notes.txt")


def write_broken(folder: Path, *names: str) -> list[Path]:
    """Plant the named broken files (keys of BROKEN_FILES) in `folder`."""
    real = first_jpeg()
    paths = []
    for name in names:
        make, _ = BROKEN_FILES[name]
        (folder / name).write_bytes(make(real))
        paths.append(folder / name)
    return paths


def make_bad_folder(dst: Path, undecodable_copies: int = 0) -> int:
    """Four classes of the mini set, with two files skipped at the scan and 2 + `undecodable_copies` that fail
    to decode planted in the first; returns how many bad files it holds."""
    first = copy_mini_classes(dst, 4)[0]
    write_broken(first, "zero.JPEG", "notes.txt", "truncated.JPEG", "fake.jpg")
    for k in range(undecodable_copies):
        (first / f"fake_{k}.jpg").write_text(f"text number {k} with an image extension")
    return 4 + undecodable_copies


def make_split(root: Path, classes: dict[str, int], mini_root: Path) -> Path:
    """An ImageFolder under `root` with `n` real imagenette images per named class."""
    sources = sorted((mini_root / "train").glob("*/*.JPEG"))
    i = 0
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for _ in range(n):
            shutil.copy(sources[i], root / name / f"{i}.JPEG")
            i += 1
    return root


def random_mae(size: str, patch: int, img: int, seed: int = 0) -> torch.nn.Module:
    """A small-decoder MAE whose every parameter is random (so swapped or dropped weights show)."""
    torch.manual_seed(seed)
    mae = mae_vit(size, patch_size=patch, img_size=img, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return mae.eval()


def save_as_our_checkpoint(mae: torch.nn.Module, run: Path, size: str, patch: int, img: int, tmp: Path) -> Path:
    """`random_mae`'s model saved as a checkpoint of our run folder `run` (config.yaml written in `tmp`)."""
    from mae_et.checkpoint import save_checkpoint
    from mae_et.recipes import save_config
    from mae_et.train.config import PretrainConfig

    cfg = PretrainConfig()
    cfg.model.size, cfg.model.patch_size = size, patch
    cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads = 32, 1, 2
    cfg.data.crop_size = img
    save_config(cfg, tmp / "config.yaml")
    return save_checkpoint(
        run / "checkpoints",
        7,
        mae.state_dict(),
        {"step": 7},
        (tmp / "config.yaml").read_text(),
        {"step": 7, "total_steps": 7, "global_batch": 16, "complete": True},  # the fields a run's meta has
        keep_last=1,
    )


# ---------------------------------------------------------------- faults: a full disk, unreadable files, lying headers

MOUNT = "mount -t tmpfs -o size={size} tmpfs {dir}"


def namespace_prefix() -> list[str] | None:
    """An `unshare` command line under which this user may mount a small tmpfs (`MOUNT`, in a private mount
    namespace: it goes with the command), or None."""
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        try:
            probe = subprocess.run(
                [*prefix, "sh", "-c", MOUNT.format(size="100k", dir="/tmp")], capture_output=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return None


def plain_user_prefix(tmp: Path) -> list[str] | None:
    """A command prefix under which file permissions hold, as for a user who is not root: none needed for one;
    for root, `setpriv` dropping the capabilities that override them. None when neither works here."""
    if os.geteuid() != 0:
        return []
    locked = tmp / "locked_probe"
    locked.write_text("x")
    locked.chmod(0)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    try:
        probe = subprocess.run([*prefix, "cat", str(locked)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        locked.unlink()
    return prefix if probe.returncode != 0 else None


# One interpreter for several runs of a command under one prefix (a mount namespace, a plain user): its main(argv)
# for each argv in turn, each ended by a mark line on stdout and stderr with its exit status (the SystemExit code).
MAINS = """
import importlib, json, sys
main = importlib.import_module(sys.argv[1]).main
for argv in json.loads(sys.argv[2]):
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    for stream in (sys.stdout, sys.stderr):
        print(f"{sys.argv[3]} {code}", file=stream, flush=True)
"""
MAINS_MARK = "--- main ended, exit status"


def mains_command(module: str, argvs: list[list[str]]) -> list[str]:
    """`python -c MAINS`: `module`.main(argv) for each argv, in one process (3-4 s of imports once, not per run)."""
    return [sys.executable, "-c", MAINS, module, json.dumps(argvs), MAINS_MARK]


def split_mains(stdout: str, stderr: str) -> list[subprocess.CompletedProcess]:
    """The output of a `mains_command` as one CompletedProcess per main() call (its exit status, stdout, stderr);
    output after the last call (a command the shell ran next) is left out."""
    outs, errs = stdout.split(f"{MAINS_MARK} "), stderr.split(f"{MAINS_MARK} ")
    runs, code = [], None
    for i in range(len(outs) - 1):
        out, err = outs[i], errs[i]
        if i:  # each chunk after the first starts with the previous call's status line
            out, err = out.split("\n", 1)[1], err.split("\n", 1)[1]
        code = int(outs[i + 1].split("\n", 1)[0])
        runs.append(subprocess.CompletedProcess([], code, out, err))
    return runs


def lie_about_a_shape(file: Path, name: str, shape: list[int]) -> None:
    """Rewrite a safetensors header so that tensor `name` claims `shape` (the same number of elements: the file
    still opens), the header padded to its old length."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header[name]["shape"] = shape
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= length
    file.write_bytes(data[:8] + new + b" " * (length - len(new)) + data[8 + length :])


# ----------------------------------------------------------------------------- an independent FLOP count


def counted_forward_flops(model: torch.nn.Module, imgs: torch.Tensor, **forward_kwargs) -> float:
    """Matrix-multiply FLOPs per image of one forward pass, as torch's FlopCounterMode counts them on the real
    model (convolutions and linear layers; attention as explicit q @ k^T and attn @ v matmuls: timm's fused
    attention is switched off for the count, since the counter does not see the CPU's fused kernel). The
    check of mae_et.models.flops, which derives the same figure from the architecture by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attention]
    for m in attention:
        m.fused_attn = False
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(imgs, **forward_kwargs)
    finally:
        for m, f in zip(attention, fused):
            m.fused_attn = f
    return counter.get_total_flops() / imgs.shape[0]


# ----------------------------------------------------------------- start points (model.init) of the micro MAE's shape
# the micro MAE of the CPU recipe: 64 wide, 2 blocks, 2 heads, patch 8 at 48 px; decoder 32 x 1, 2 heads


def transformers_folder(tmp_path, layer_norm_eps: float = 1e-12):
    """A ViTMAEForPreTraining of the micro shape, random, written by transformers itself (the Hub's eps)."""
    import transformers

    torch.manual_seed(1)
    config = transformers.ViTMAEConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=48,
        patch_size=8,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=128,
        layer_norm_eps=layer_norm_eps,
    )
    model = transformers.ViTMAEForPreTraining(config)
    with torch.no_grad():  # as the Hub's folders hold them (transformers 5 leaves a new model's tables at zero)
        model.vit.embeddings.position_embeddings.copy_(get_2d_sincos_pos_embed(64, 6, cls_token=True)[None])
        model.decoder.decoder_pos_embed.copy_(get_2d_sincos_pos_embed(32, 6, cls_token=True)[None])
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def official_pth(tmp_path, decoder: bool = True):
    """An official-format training file: {"model": reference names + the sin-cos tables, "args": Namespace}."""
    import argparse

    mae = random_mae("micro", 8, 48, seed=3)
    state = {k: v for k, v in mae.state_dict().items() if decoder or not k.startswith(("decoder_", "mask_token"))}
    state["pos_embed"] = get_2d_sincos_pos_embed(64, 6, cls_token=True).unsqueeze(0)
    if decoder:
        state["decoder_pos_embed"] = get_2d_sincos_pos_embed(32, 6, cls_token=True).unsqueeze(0)
    path = tmp_path / ("mae_full.pth" if decoder else "mae_encoder.pth")
    torch.save({"model": state, "args": argparse.Namespace(model="mae_vit_micro"), "epoch": 799}, path)
    return path, mae
