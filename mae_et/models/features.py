"""What an encoder's features say: one pass of the unmasked encoder over a loader (cls and mean pooling), and the
weighted kNN on them (Wu et al. 2018, as in DINO), shared by the kNN monitor, `mae-et knn`, the cached probe and the
study, so a kNN figure means the same everywhere (docs/design.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from mae_et.data.folder import DataError
from mae_et.data.labelled import build_eval_loader
from mae_et.models.vit import FeaturePool, pool_tokens
from mae_et.notices import progress

__all__ = ["extract_features", "extract_pools", "knn_accuracy", "knn_classify", "knn_evaluate", "knn_evaluate_loaders"]


def _check_knn_inputs(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk: int,
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
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}), got [{int(train_labels.min())}, {int(train_labels.max())}]"
        )
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
        sim = test[start : start + chunk] @ train.T  # (c, N) cosine similarities
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


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def extract_pools(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device | None,
    pools: Sequence[FeaturePool],
    desc: str | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """One pass over ``loader``: {pool: (N, D) float32 CPU}, labels (N,). Model left in its mode. With `desc`,
    a progress bar (plain lines in a log) says how far it is."""
    device = model_device(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()  # no dropout / drop-path while measuring
    feats: dict[str, list[Tensor]] = {p: [] for p in pools}
    labels: list[Tensor] = []
    try:
        for images, batch_labels in progress(loader, desc=desc or "", unit="batch", enabled=desc is not None):
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
        dim = int(model.embed_dim)
        return {p: torch.zeros(0, dim) for p in pools}, torch.zeros(0, dtype=torch.int64)
    return {p: torch.cat(f) for p, f in feats.items()}, torch.cat(labels)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device | None = None,
    pool: FeaturePool = "cls",
    desc: str | None = None,
) -> tuple[Tensor, Tensor]:
    """`extract_pools` for one pool: (N, D) float32 on CPU, labels (N,) int64; an empty loader (an empty shard)
    gives (0, D) and (0,). ``model``: a timm ViT or our MAE, on ``device`` (None = the model's)."""
    feats, labels = extract_pools(model, loader, device, [pool], desc)
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
    pools: Sequence[FeaturePool] = ("cls", "mean"),
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """kNN top-1 (percent) of the frozen encoder, per pooling: {"knn_top1_cls": .., "knn_top1_mean": ..}.

    The train split defines the classes; the val split must have the same class folders.
    One encoder pass per split serves every pooling.
    """
    train_loader = build_eval_loader(train_root, img_size, batch_size, num_workers)
    classes = train_loader.dataset.classes
    val_loader = build_eval_loader(val_root, img_size, batch_size, num_workers, classes=classes)
    return knn_evaluate_loaders(
        model,
        train_loader,
        val_loader,
        len(classes),
        k,
        temperature,
        pools,
        device,
        names=(str(train_root), str(val_root)),
    )


@torch.no_grad()
def knn_evaluate_loaders(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    pools: Sequence[FeaturePool] = ("cls", "mean"),
    device: str | torch.device | None = None,
    names: tuple[str, str] = ("train", "val"),
) -> dict[str, float]:
    """`knn_evaluate` on any two loaders of (normalised images (B, 3, S, S), labels (B,)): e.g. generated fractals."""
    train_feats, train_labels = extract_pools(model, train_loader, device, pools, f"kNN features: {names[0]}")
    val_feats, val_labels = extract_pools(model, val_loader, device, pools, f"kNN features: {names[1]}")
    for name, labels in zip(names, (train_labels, val_labels)):
        if labels.numel() == 0:
            raise DataError(f"no readable images in '{name}'; check the data folder")
    return {
        f"knn_top1_{pool}": knn_accuracy(
            train_feats[pool], train_labels, val_feats[pool], val_labels, num_classes, k=k, temperature=temperature
        )
        for pool in pools
    }
