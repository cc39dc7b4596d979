"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018, as used by DINO).

Each test sample votes over its k most cosine-similar training samples, each neighbour weighted by
``exp(similarity / T)``; the class with the largest summed weight wins. Cheap, no training, and
therefore the online monitor of pretraining as well as an offline metric:

    python -m mae_et.knn RUN_OR_CHECKPOINT --data /path/to/imagenet [--k 20 --temperature 0.07]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from mae_et.checkpoint import CheckpointError
from mae_et.data import IMAGENET_MEAN, IMAGENET_STD, DataError, ImageFolderIndex, load_rgb, scan_image_folder
from mae_et.notices import DataWarning
from mae_et.vit import FEATURE_POOLS, LoadError, load_pretrained_vit, pool_tokens

__all__ = [
    "EvalImageFolder",
    "build_eval_loader",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "knn_evaluate",
    "main",
]


# --------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------
def _check_knn_inputs(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int, k: int, temperature: float, chunk: int
) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be (N, D) and (M, D), got {tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test feature dims differ: {train_features.shape[1]} vs {test_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must be ({train_features.shape[0]},), got {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("no training features: the kNN needs at least one training sample")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if train_labels.numel() and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(f"train_labels must lie in [0, {num_classes}), got [{int(train_labels.min())}, {int(train_labels.max())}]")
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Predicted labels (M,) of ``test_features`` by a similarity-weighted vote of k neighbours.

    ``k`` larger than the training set uses all training samples. Test samples are processed
    ``chunk`` at a time so the (chunk, N) similarity matrix, not (M, N), bounds the memory.
    """
    _check_knn_inputs(train_features, train_labels, test_features, num_classes, k, temperature, chunk)
    train = F.normalize(train_features.float(), dim=1)  # (N, D)
    test = F.normalize(test_features.float().to(train.device), dim=1)  # (M, D)
    labels = train_labels.to(device=train.device, dtype=torch.int64)  # (N,)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T  # (c, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k) each
        weights = (top_sim / temperature).exp()  # (c, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)  # (c, C)
        votes.scatter_add_(1, labels[top_idx], weights)  # (c, C) summed weight per class
        preds.append(votes.argmax(dim=1))  # (c,)
    if not preds:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(preds).cpu()  # (M,)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of ``knn_classify`` in percent."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must be ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    if test_labels.numel() == 0:
        raise ValueError("no test features: the accuracy of an empty set is undefined")
    preds = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature, chunk)  # (M,)
    correct = int((preds == test_labels.cpu().long()).sum())
    return 100.0 * correct / test_labels.numel()  # exact in Python floats (no float32 mean)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
class EvalImageFolder(Dataset):
    """Deterministic eval view of an ImageFolder: resize the short side, centre crop, normalise.

    An undecodable file yields None (warned once) and is dropped by ``collate_eval``, the way
    pretraining skips bad files instead of stopping.
    """

    def __init__(self, index: ImageFolderIndex, img_size: int, label_of: list[int]) -> None:
        self.index = index
        self.classes = index.classes
        self.img_size = img_size
        # The usual 0.875 crop ratio: resize to img_size*256/224, then centre crop img_size.
        self.resize_size = int(img_size * 256 / 224)
        self.label_of = label_of  # folder index in this split -> label in the reference mapping
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)  # (3, 1, 1)

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        path, folder_label = self.index.samples[i]
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            warnings.warn(f"cannot decode '{path}' ({type(e).__name__}: {e}); skipping it", DataWarning)
            return None
        img = TF.resize(img, [self.resize_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [self.img_size, self.img_size])
        x = TF.pil_to_tensor(img).float().div_(255.0)  # (3, S, S) in [0, 1]
        x = (x - self.mean) / self.std  # (3, S, S)
        return x, self.label_of[folder_label]


def collate_eval(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor]:
    good = [it for it in items if it is not None]
    if not good:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, dtype=torch.int64)
    images = torch.stack([it[0] for it in good])  # (B, 3, S, S)
    labels = torch.tensor([it[1] for it in good], dtype=torch.int64)  # (B,)
    return images, labels


def build_eval_loader(
    root: str | Path,
    img_size: int,
    batch_size: int,
    num_workers: int,
    classes: list[str] | None = None,
) -> DataLoader:
    """Ordered DataLoader of (images (B, 3, S, S) float, labels (B,)) for an ImageFolder split.

    ``classes`` (the train split's class list) fixes the label of each class folder, so that
    train and val agree; every listed class must exist here and no other.
    ``loader.dataset.classes`` is the class list the labels index.
    """
    if img_size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"img_size and batch_size must be >= 1 and num_workers >= 0, got {img_size}, {batch_size}, {num_workers}")
    index = scan_image_folder(root)
    if classes is None:
        label_of = list(range(len(index.classes)))
    else:
        missing = [c for c in classes if c not in index.classes]
        extra = [c for c in index.classes if c not in classes]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks the classes {', '.join(missing)}")
            if extra:
                parts.append(f"has classes the train split lacks: {', '.join(extra)}")
            raise DataError(f"split '{root}' {' and '.join(parts)}; both splits need the same class folders")
        position = {c: i for i, c in enumerate(classes)}
        label_of = [position[c] for c in index.classes]
        index = ImageFolderIndex(root=index.root, classes=list(classes), samples=index.samples, skipped=index.skipped)
    dataset = EvalImageFolder(index, img_size, label_of)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval,
        drop_last=False,
    )


# --------------------------------------------------------------------------------------
# Features and evaluation
# --------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def _extract_pools(
    model: nn.Module, loader: DataLoader, device: str | torch.device | None, pools: Sequence[str]
) -> tuple[dict[str, Tensor], Tensor]:
    """One pass over ``loader``: {pool: (N, D) float32 CPU}, labels (N,). Model left in its mode."""
    for pool in pools:
        if pool not in FEATURE_POOLS:
            raise ValueError(f"pool {pool!r} is unknown; choose among {', '.join(FEATURE_POOLS)}")
    device = _model_device(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()  # no dropout / drop-path while measuring
    feats: dict[str, list[Tensor]] = {p: [] for p in pools}
    labels: list[Tensor] = []
    try:
        for images, batch_labels in loader:
            if images.shape[0] == 0:  # every file of the batch was unreadable
                continue
            images = images.to(device, non_blocking=True)  # (B, 3, S, S)
            tokens = model.forward_features(images)  # (B, 1+L, D), never masked
            for pool in pools:
                feats[pool].append(pool_tokens(model, tokens, pool).float().cpu())  # (B, D)
            labels.append(batch_labels.cpu())
    finally:
        model.train(was_training)
    if not labels:
        # An empty shard (more processes than batches) is legal: (0, D) keeps gathers working.
        dim = int(getattr(model, "embed_dim"))
        return {p: torch.zeros(0, dim) for p in pools}, torch.zeros(0, dtype=torch.int64)
    return {p: torch.cat(f) for p, f in feats.items()}, torch.cat(labels)


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, device: str | torch.device | None = None, pool: str = "cls"
) -> tuple[Tensor, Tensor]:
    """Unmasked encoder features of every sample: (N, D) float32 on CPU, labels (N,) int64.

    A loader that yields nothing (an empty shard) gives (0, D) and (0,).

    ``model`` is a timm ViT or our MAE, already on ``device`` (None = the model's device); it is
    evaluated in eval mode and given back in the mode it had.
    """
    feats, labels = _extract_pools(model, loader, device, [pool])
    return feats[pool], labels


@torch.no_grad()
def knn_evaluate(
    model: nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    img_size: int,
    batch_size: int = 64,
    num_workers: int = 2,
    k: int = 20,
    temperature: float = 0.07,
    pools: Sequence[str] = ("cls", "mean"),
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """kNN top-1 (percent) of the frozen encoder, per pooling: {"knn_top1_cls": .., "knn_top1_mean": ..}.

    The train split defines the classes; the val split must have the same class folders.
    One encoder pass per split serves every pooling.
    """
    train_loader = build_eval_loader(train_root, img_size, batch_size, num_workers)
    classes = train_loader.dataset.classes
    val_loader = build_eval_loader(val_root, img_size, batch_size, num_workers, classes=classes)
    return knn_evaluate_loaders(model, train_loader, val_loader, len(classes), k, temperature, pools, device,
                                names=(str(train_root), str(val_root)))


@torch.no_grad()
def knn_evaluate_loaders(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    pools: Sequence[str] = ("cls", "mean"),
    device: str | torch.device | None = None,
    names: tuple[str, str] = ("train", "val"),
) -> dict[str, float]:
    """`knn_evaluate` on any two loaders of (normalised images (B, 3, S, S), labels (B,)): e.g. generated fractals."""
    train_feats, train_labels = _extract_pools(model, train_loader, device, pools)
    val_feats, val_labels = _extract_pools(model, val_loader, device, pools)
    for name, labels in zip(names, (train_labels, val_labels)):
        if labels.numel() == 0:
            raise DataError(f"no readable images in '{name}'; check the data folder")
    return {
        f"knn_top1_{pool}": knn_accuracy(
            train_feats[pool], train_labels, val_feats[pool], val_labels, num_classes, k=k, temperature=temperature
        )
        for pool in pools
    }


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def _split_dir(root: Path, split: str, flag: str) -> Path:
    path = root / split if split else root
    if not path.is_dir():
        raise DataError(f"split folder '{path}' does not exist; fix --data or {flag} (ImageFolder layout ROOT/SPLIT/<class>/<image>)")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mae_et.knn",
        description="Weighted kNN top-1 (k=20, T=0.07) of a pretrained encoder's cls and mean-pooled features",
    )
    parser.add_argument("checkpoint", help="run folder, checkpoint folder, official MAE .pth or timm state dict")
    parser.add_argument("--data", required=True, help="ImageFolder root holding the train and val splits")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--img-size", type=int, default=None, help="default: the size the encoder was pretrained at")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the accuracies to this JSON file")
    args = parser.parse_args(argv)
    try:
        root = Path(args.data)
        train_root = _split_dir(root, args.train_split, "--train-split")
        val_root = _split_dir(root, args.val_split, "--val-split")
        model, spec = load_pretrained_vit(args.checkpoint, img_size=args.img_size)
        img_size = args.img_size or spec.img_size
        model.to(args.device)
        results = knn_evaluate(
            model, train_root, val_root, img_size, batch_size=args.batch_size, num_workers=args.num_workers,
            k=args.k, temperature=args.temperature, device=args.device,
        )
    except (LoadError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for key, value in results.items():
        print(f"{key}: {value:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**results, "checkpoint": str(args.checkpoint), "img_size": img_size,
                                               "k": args.k, "temperature": args.temperature}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
