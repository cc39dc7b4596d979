"""mae_et.models.features: the weighted kNN on known answers, chunking and bad input; the feature pass (bad images
skipped, an empty loader, the same features from the pretraining MAE as from the exported ViT), kNN end to end."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_split

from mae_et.checkpoint import MODEL_FILE, list_checkpoints
from mae_et.data.labelled import build_eval_loader
from mae_et.models.features import extract_features, knn_accuracy, knn_classify, knn_evaluate
from mae_et.models.mae import mae_vit
from mae_et.models.vit import load_pretrained_vit


def unit(angle_cos: float, sign: float = 1.0) -> list[float]:
    """2-D unit vector whose cosine with (1, 0) is angle_cos."""
    return [angle_cos, sign * math.sqrt(1.0 - angle_cos**2)]


def test_two_separated_clusters_are_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # (2, 3)
    train = torch.cat(
        [centres[0] + 0.3 * torch.randn(20, 3, generator=g), centres[1] + 0.3 * torch.randn(20, 3, generator=g)]
    )
    train_labels = torch.tensor([0] * 20 + [1] * 20)
    test = torch.cat(
        [centres[0] + 0.3 * torch.randn(10, 3, generator=g), centres[1] + 0.3 * torch.randn(10, 3, generator=g)]
    )
    test_labels = torch.tensor([0] * 10 + [1] * 10)
    assert knn_accuracy(train, train_labels, test, test_labels, num_classes=2, k=5) == 100.0
    assert torch.equal(knn_classify(train, train_labels, test, num_classes=2, k=5), test_labels)


def test_weighted_vote_beats_count_vote():
    # Test point (1, 0). Its three nearest neighbours: one class-0 sample with cosine 0.9 and two
    # class-1 samples with cosines 0.5 and 0.4 (a far class-0 sample, cosine -1, is not among them).
    # By count class 1 wins 2:1. With weights exp(cos / T):
    #   T = 0.07: class 0: e^(0.9/0.07) = e^12.857 = 3.83e5;  class 1: e^7.143 + e^5.714 = 1265 + 303 = 1568  -> 0
    #   T = 1.0 : class 0: e^0.9 = 2.460;                     class 1: e^0.5 + e^0.4 = 1.649 + 1.492 = 3.141 -> 1
    train = torch.tensor([unit(0.9), unit(0.5), unit(0.4, -1.0), [-1.0, 0.0]]) * 3.0  # scale must not matter
    train_labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[2.0, 0.0]])
    assert knn_classify(train, train_labels, test, num_classes=2, k=3, temperature=0.07).tolist() == [0]
    assert knn_classify(train, train_labels, test, num_classes=2, k=3, temperature=1.0).tolist() == [1]
    # k = 1 takes the single nearest sample.
    assert knn_classify(train, train_labels, test, num_classes=2, k=1, temperature=1.0).tolist() == [0]


def test_k_larger_than_train_set_uses_all():
    train = torch.tensor([unit(0.9), unit(0.5), unit(0.4, -1.0)])
    train_labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    # All 3 vote, T = 1: class 0 e^0.9 = 2.46 < class 1 e^0.5 + e^0.4 = 3.14.
    assert knn_classify(train, train_labels, test, num_classes=2, k=100, temperature=1.0).tolist() == [1]
    assert knn_classify(train, train_labels, test, num_classes=3, k=100, temperature=1.0).tolist() == [1]


def test_chunking_gives_the_same_answer():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(200, 16, generator=g)
    train_labels = torch.randint(0, 7, (200,), generator=g)
    test = torch.randn(53, 16, generator=g)
    whole = knn_classify(train, train_labels, test, num_classes=7, k=10, chunk=1024)
    for chunk in (1, 5, 52, 53):
        assert torch.equal(knn_classify(train, train_labels, test, num_classes=7, k=10, chunk=chunk), whole)
    assert whole.shape == (53,) and whole.dtype == torch.int64


def test_bad_inputs_are_one_line_errors():
    train, labels, test = torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 3)
    with pytest.raises(ValueError, match="feature dims differ"):
        knn_classify(train, labels, torch.randn(2, 5), num_classes=2)
    with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 2\)"):
        knn_classify(train, torch.tensor([0, 1, 2, 0]), test, num_classes=2)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(train, labels, test, num_classes=2, temperature=0.0)
    with pytest.raises(ValueError, match="k and chunk"):
        knn_classify(train, labels, test, num_classes=2, k=0)


def test_unreadable_images_are_skipped_and_empty_loader_gives_empty_features(tmp_path, mini_root):
    val = make_split(tmp_path / "val", {"a": 2}, mini_root)
    (val / "a" / "broken.JPEG").write_bytes(b"not a jpeg at all")  # found only when decoded
    vit = mae_vit("micro", patch_size=8, img_size=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    with pytest.warns(UserWarning, match="cannot decode"):
        feats, labels = extract_features(vit, build_eval_loader(val, 32, 1, 0), "cpu")
    assert feats.shape == (2, 64) and labels.tolist() == [0, 0]
    empty, no_labels = extract_features(vit, [], "cpu")  # e.g. a rank's empty shard
    assert empty.shape == (0, 64) and no_labels.shape == (0,)


def test_knn_evaluate_on_imagenette_mini(micro_run, mini_root):
    vit, spec = load_pretrained_vit(micro_run)
    vit.train()
    result = knn_evaluate(vit, mini_root / "train", mini_root / "val", spec.img_size, batch_size=64, num_workers=0)
    assert set(result) == {"knn_top1_cls", "knn_top1_mean"}
    assert all(0.0 <= v <= 100.0 for v in result.values())
    assert vit.training  # given back in the mode it had

    # The pretraining loop's own MAE gives the same features as the exported timm ViT.
    ckpt = list_checkpoints(micro_run / "checkpoints")[-1]
    from safetensors.torch import load_file

    mae = mae_vit("micro", patch_size=8, img_size=48, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    mae.load_state_dict(load_file(str(ckpt / MODEL_FILE)))
    loader = build_eval_loader(mini_root / "val", 48, 50, 0)
    f_vit, y_vit = extract_features(vit, loader, "cpu", pool="mean")
    f_mae, y_mae = extract_features(mae, loader, None, pool="mean")
    assert f_vit.shape == (100, 64) and f_vit.dtype == torch.float32
    assert torch.equal(y_vit, y_mae) and sorted(set(y_vit.tolist())) == list(range(10))
    torch.testing.assert_close(f_vit, f_mae, atol=1e-5, rtol=0)
