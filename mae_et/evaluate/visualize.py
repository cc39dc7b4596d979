"""`mae-et visualize RUN_OR_CHECKPOINT IMAGES... --out grid.png [--size B] [--mask-ratio 0.75]`: the reconstruction
figure the pretraining loop writes (`mae_et.models.figures`), for any checkpoint and any images."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
import yaml
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode

from mae_et import checkpoint as ckpt_lib
from mae_et.cli import OneLineParser, run_user_command
from mae_et.curriculum.frequency import FREQUENCY_MODES, low_frequency_crop
from mae_et.data.folder import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DataError, load_rgb, normalize_on_device
from mae_et.files import check_output_file, write_atomic
from mae_et.models.figures import panel_titles, reconstruction_grid, save_png, titled_figure
from mae_et.models.keys import compare_state
from mae_et.models.mae import MaskedAutoencoderViT, build_mae
from mae_et.recipes import ConfigError, build_config
from mae_et.train.config import PretrainConfig, mae_spec

__all__ = ["find_images", "load_image_batch", "load_mae", "main"]


# ----------------------------------------------------------------------------- loading


def load_mae(checkpoint_or_run: str | os.PathLike) -> tuple[MaskedAutoencoderViT, PretrainConfig]:
    """The full MAE (encoder + decoder) of a checkpoint, in eval mode on the CPU, and its config.

    A run folder gives its latest checkpoint. Only the weights and config.yaml are read (not the
    optimizer state), and the weights must match the config's model exactly (strict load).
    """
    folder = ckpt_lib.resolve_checkpoint(checkpoint_or_run)
    for name in (ckpt_lib.CONFIG_FILE, ckpt_lib.MODEL_FILE):
        if not (folder / name).is_file():
            raise ckpt_lib.CheckpointError(f"checkpoint '{folder}' has no {name}; it was not written by pretrain.py")
    ckpt_lib.check_readable(folder / ckpt_lib.CONFIG_FILE, folder / ckpt_lib.MODEL_FILE)
    try:
        saved = yaml.safe_load((folder / ckpt_lib.CONFIG_FILE).read_text()) or {}
        ckpt_lib.require_pretraining(folder, saved)
        cfg = build_config(PretrainConfig, saved)
    except (ConfigError, yaml.YAMLError) as e:
        raise ckpt_lib.CheckpointError(
            f"checkpoint '{folder}': unusable {ckpt_lib.CONFIG_FILE} ({_one_line(e)})"
        ) from e
    try:
        state = load_file(str(folder / ckpt_lib.MODEL_FILE), device="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file means the same to the user
        raise ckpt_lib.CheckpointError(
            f"checkpoint '{folder}': unreadable {ckpt_lib.MODEL_FILE} ({type(e).__name__}: {e})"
        ) from e
    model = build_mae(mae_spec(cfg))
    mismatch = compare_state(state, model.state_dict())
    if mismatch:  # our own one-line message rather than torch's multi-line strict error
        raise ckpt_lib.CheckpointError(
            f"checkpoint '{folder}' does not match its config's model: {mismatch.summary(3)}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def _one_line(e: BaseException) -> str:
    """A YAML error's first line (its problem, e.g. a refused python/object tag) and where; others as they are."""
    text = str(e).strip()
    if not isinstance(e, yaml.YAMLError) or not text:
        return text
    mark = getattr(e, "problem_mark", None)
    first = text.splitlines()[0]
    return f"{first}, line {mark.line + 1}" if mark is not None else first


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from files and folders (folders searched recursively, sorted, hidden entries skipped)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not inside:
                raise DataError(f"folder '{p}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(inside)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"image '{p}' does not exist")
    return found


def load_image_batch(
    paths: Sequence[str | os.PathLike],
    crop_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Float (N, 3, S, S), S = crop_size: shorter side resized to S, centre crop, normalised."""
    crops = []
    for path in paths:
        try:
            img = load_rgb(os.fspath(path))
        except Exception as e:  # noqa: BLE001 - as the training loader: PIL raises many types (DecompressionBombError)
            raise DataError(f"cannot read image '{path}' ({type(e).__name__}: {e})") from e
        # The evaluation view of the whole image (no random crop), at the size the model was trained at.
        img = TF.resize(img, crop_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [crop_size, crop_size])
        crops.append(TF.pil_to_tensor(img))  # (3, S, S) uint8
    return normalize_on_device(torch.stack(crops), tuple(mean), tuple(std))  # (N, 3, S, S)


# ----------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = OneLineParser(
        prog=prog,
        description="Reconstruction grid of a pretrained MAE: original | masked | reconstruction | "
        "reconstruction + visible "
        "(HOG target: original | masked | predicted HOG | target HOG).",
    )
    parser.add_argument("checkpoint", help="run folder (latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument(
        "--out", required=True, help="PNG file to write (not inside a run's checkpoints/ or an image folder read)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    parser.add_argument(
        "--size", type=int, default=None, help="input side B after the low-frequency crop (default: the full crop size)"
    )
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches removed (default 0.75)")
    parser.add_argument(
        "--mode",
        choices=FREQUENCY_MODES,
        default=None,
        help="low-frequency crop: fft (ET) or resize (ET++); default: the one the checkpoint was trained with",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    parser.add_argument("--max-images", type=int, default=16, help="use at most this many images (default 16)")
    return parser.parse_args(argv)


def run_visualize(args: argparse.Namespace) -> None:
    """The grid written to --out, every input checked before the work."""
    if not 0.0 < args.mask_ratio < 1.0:
        raise ConfigError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if args.max_images < 1:
        raise ConfigError(f"--max-images must be >= 1, got {args.max_images}")
    # the output before any work: never an input, never in a checkpoint, an existing file only when asked
    check_output_file(
        args.out, reads=[args.checkpoint, *args.images], overwrite=args.overwrite, flag="--out", suffix=".png"
    )
    model, cfg = load_mae(args.checkpoint)
    full, patch = cfg.data.crop_size, model.patch_size
    size = full if args.size is None else args.size
    if not (patch <= size <= full and size % patch == 0):
        raise ConfigError(
            f"--size {size} must be a multiple of the patch size {patch} between {patch} and the crop size {full}"
        )
    paths = find_images(args.images)
    if len(paths) > args.max_images:
        print(f"using the first {args.max_images} of {len(paths)} images (--max-images)", file=sys.stderr)
        paths = paths[: args.max_images]
    imgs = load_image_batch(paths, full)  # (N, 3, S, S)
    imgs = low_frequency_crop(imgs, size, args.mode or cfg.curriculum.mode)  # (N, 3, B, B)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.rand((len(paths), (size // patch) ** 2), generator=gen)  # (N, L): the same mask for the same seed
    grid = reconstruction_grid(model, imgs, IMAGENET_MEAN, IMAGENET_STD, mask_ratio=args.mask_ratio, noise=noise)
    titles = panel_titles(model)
    figure = titled_figure(grid, titles)
    try:
        write_atomic(args.out, lambda tmp: save_png(figure, tmp))
    except OSError as e:  # an unwritable --out is the user's to fix, not a bug
        raise DataError(f"cannot write '{args.out}' ({type(e).__name__}: {e.strerror or e})") from e
    print(f"wrote {args.out}: {len(paths)} images at B={size}, mask ratio {args.mask_ratio} ({' | '.join(titles)})")


def main(argv: Sequence[str] | None = None, prog: str = "python -m mae_et.evaluate.visualize") -> None:
    args = _parse_args(argv, prog)
    run_user_command(lambda: run_visualize(args))


if __name__ == "__main__":
    main()
