"""Tests for mae_et.models.figures: the reconstruction grid's panels, its un-normalised norm-pix predictions, the PNG
written back bit for bit, and every masked patch shown whatever share a run trained with."""

from __future__ import annotations

import numpy as np
import torch

from mae_et.models.figures import reconstruction_grid, save_png
from mae_et.models.mae import MaskedAutoencoderViT, mae_vit

P = 8
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def micro(norm_pix_loss: bool = False, img_size: int = 32, decoder_depth: int = 1) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return mae_vit(
        "micro",
        patch_size=P,
        img_size=img_size,
        decoder_embed_dim=32,
        decoder_depth=decoder_depth,
        decoder_num_heads=2,
        norm_pix_loss=norm_pix_loss,
    )


def _panel(grid: torch.Tensor, row: int, col: int, side: int, pad: int = 2) -> torch.Tensor:
    y = pad + row * (side + pad)
    x = pad + col * (side + pad)
    return grid[:, y : y + side, x : x + side]


def _normalise(raw: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (raw - m) / s


def test_reconstruction_grid_shape_and_mode(tmp_path):
    model = micro()
    model.train()
    imgs = _normalise(torch.rand(2, 3, 32, 32))
    grid = reconstruction_grid(model, imgs, MEAN, STD)
    assert grid.dtype == torch.uint8
    assert grid.shape == (3, 2 + 2 * (32 + 2), 2 + 4 * (32 + 2))
    assert model.training
    model.eval()
    reconstruction_grid(model, imgs, MEAN, STD)
    assert not model.training

    path = tmp_path / "sub" / "grid.png"
    save_png(grid, path)
    from PIL import Image

    back = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)  # (3, H, W)
    assert back.equal(grid)


def test_reconstruction_grid_unnormalises_norm_pix(monkeypatch):
    model = micro(norm_pix_loss=True)
    raw = torch.rand(2, 3, 32, 32)
    imgs = _normalise(raw)
    target = model.patchify(imgs)  # (N, L, p*p*3)
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True)
    norm_target = (target - mean) / (var + 1e-6) ** 0.5
    # The decoder "predicts" the exact norm-pix target; un-normalising must give back the image.
    monkeypatch.setattr(model, "forward_decoder", lambda latent, ids_restore: norm_target)
    noise = torch.rand(2, 16)
    grid = reconstruction_grid(model, imgs, MEAN, STD, noise=noise).int()
    mask = model(imgs, noise=noise).mask  # (2, 16)
    for row in range(2):
        original = _panel(grid, row, 0, 32)
        assert (original - (raw[row] * 255).round().int()).abs().max() <= 1
        assert (_panel(grid, row, 2, 32) - original).abs().max() <= 1
        assert (_panel(grid, row, 3, 32) - original).abs().max() <= 1
        # masked patches are grey in the second panel, visible ones untouched
        pix_mask = mask[row].view(4, 4).repeat_interleave(P, 0).repeat_interleave(P, 1).bool()  # (32, 32)
        masked_panel = _panel(grid, row, 1, 32)
        assert torch.all((masked_panel[:, pix_mask] - 128).abs() <= 1)
        assert masked_panel[:, ~pix_mask].equal(original[:, ~pix_mask])


def test_reconstruction_grid_shows_every_masked_patch(monkeypatch):
    """The monitor's / visualize's reconstruction decodes every masked patch (the model's default share), so a run
    trained with a quarter of them still shows whole pictures."""
    model = micro(img_size=64, decoder_depth=2)
    shares = []
    real = MaskedAutoencoderViT.forward

    def spy(self, imgs, mask_ratio=0.75, noise=None, decode_fraction=1.0):
        out = real(self, imgs, mask_ratio, noise, decode_fraction)
        shares.append((decode_fraction, out.scored, (out.pred.abs().sum(-1) > 0).all().item()))
        return out

    monkeypatch.setattr(MaskedAutoencoderViT, "forward", spy)
    reconstruction_grid(model, torch.randn(2, 3, 64, 64), MEAN, STD, mask_ratio=0.75, noise=torch.rand(2, 64))
    assert shares == [(1.0, None, True)]
