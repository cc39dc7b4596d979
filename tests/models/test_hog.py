"""The HOG target (model.target=hog): MaskFeat's histograms of oriented gradients per patch, checked against a plain
NumPy reference written here from the definition, on real ImageNet JPEGs, and wired into the model and the config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mae_et.models.flops import mae_train_flops_per_image
from mae_et.models.hog import HOGTarget, hog_dim
from mae_et.models.mae import mae_vit
from mae_et.recipes import ConfigError
from mae_et.train.config import load_pretrain_config

MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])  # MaskFeat's x filter; y is its transpose


def reference_hog(img: np.ndarray, patch: int, cell: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) -> (L, (patch/cell)^2 * C * bins) from the definition in float64, and a same-shaped mask of the
    histograms (one channel of one cell) that hold a pixel within 1e-4 bins of a bin edge: where float32 rounding
    may pick the neighbour bin. A gradient 0 in exact arithmetic puts its pixel right on an edge (atan2 = 0 or pi),
    and pixels k/255, normalised, do that often (1, -2, 1 columns); float32 leaves a residue of either sign."""
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="reflect")  # (C, H+2, W+2)
    gx = np.zeros((c, h, w))
    gy = np.zeros((c, h, w))
    for a in range(3):  # cross-correlation with the 3 x 3 filters, as a convolution layer computes it
        for b in range(3):
            window = padded[:, a : a + h, b : b + w]
            gx += SOBEL_X[a, b] * window
            gy += SOBEL_X.T[a, b] * window
    magnitude = np.sqrt(gx**2 + gy**2)
    offsets = (np.arange(patch) - (patch - 1) / 2) / (patch / 2)
    gauss = np.outer(np.exp(-0.5 * offsets**2), np.exp(-0.5 * offsets**2))
    gauss /= gauss.sum()
    magnitude *= np.tile(gauss, (h // patch, w // patch))
    phase = np.arctan2(gx, gy) / math.pi * bins
    bin_index = np.mod(np.floor(phase).astype(np.int64), bins)
    on_edge = (np.abs(phase - np.round(phase)) < 1e-4) & (magnitude > 0)
    hist = np.zeros((c, h // cell, w // cell, bins))
    edge = np.zeros((c, h // cell, w // cell, bins), dtype=bool)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for ch in range(c):
        np.add.at(hist[ch], (rows // cell, cols // cell, bin_index[ch]), magnitude[ch])
        np.logical_or.at(edge[ch], (rows // cell, cols // cell), on_edge[ch][..., None].repeat(bins, -1))
    norm = np.sqrt((hist**2).sum(axis=-1, keepdims=True))
    hist = hist / np.maximum(norm, 1e-12)
    per = patch // cell
    out, flags = [], []
    for pi in range(h // patch):
        for pj in range(w // patch):
            cells = [(ch, pi * per + u, pj * per + v) for u in range(per) for v in range(per) for ch in range(c)]
            out.append(np.concatenate([hist[k] for k in cells]))
            flags.append(np.concatenate([edge[k] for k in cells]))
    return np.stack(out), np.stack(flags)


def real_images(mini_root, size: int, n: int = 3) -> np.ndarray:
    files = sorted((mini_root / "train").glob("*/*.JPEG"))[::37][:n]
    imgs = []
    for f in files:
        with Image.open(f) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
        imgs.append((arr.transpose(2, 0, 1) - MEAN) / STD)  # normalised, as the model sees it
    return np.stack(imgs)  # (N, 3, size, size)


@pytest.mark.parametrize("size,patch,cell", [(224, 16, 8), (64, 8, 8), (64, 8, 4), (96, 16, 16)])
def test_hog_matches_the_numpy_reference_on_real_images(mini_root, size, patch, cell):
    """In float64 (where the filter sums of float32 pixels are exact) equal to the 3 x 3 definition to 1e-6 everywhere;
    in float32, the training dtype, equal to 1e-5 in every histogram without a pixel on a bin edge (most of them)."""
    imgs = real_images(mini_root, size).astype(np.float32)  # (N, 3, size, size)
    hog = HOGTarget(patch, cell, 9)
    ours64 = hog(torch.from_numpy(imgs).double()).numpy()  # (N, L, T)
    ours32 = hog(torch.from_numpy(imgs)).numpy()
    assert ours64.shape == ours32.shape == (len(imgs), (size // patch) ** 2, hog_dim(patch, cell, 9))
    assert ours32.dtype == np.float32
    for i, img in enumerate(imgs):
        ref, on_edge = reference_hog(img.astype(np.float64), patch, cell, 9)
        np.testing.assert_allclose(ours64[i], ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(ours32[i][~on_edge], ref[~on_edge], atol=1e-5, rtol=0)
        # real JPEGs put a pixel on an edge in 10-45% of the 8-px histograms (86% of 16-px ones); float32 rounding
        # moves a few of them: measured 1-15% of histograms differ from the float64 ones by more than 1e-5
        assert on_edge.mean() < 0.9, on_edge.mean()
        same = np.isclose(ours32[i], ours64[i], atol=1e-5, rtol=0).reshape(-1, 9).all(axis=1)
        assert same.mean() > 0.8, same.mean()
        cells = ours32[i].reshape(-1, 9)
        norms = np.linalg.norm(cells, axis=1)
        flat = (cells == 0).all(axis=1)  # a cell of one flat colour has no gradient: it stays 0
        assert np.allclose(norms[~flat], 1.0, atol=1e-5) and flat.mean() < 0.2  # the rest L2-normalised


def test_hog_orientation_bins_follow_maskfeat():
    """A vertical edge (gx < 0, gy = 0: atan2 = -pi/2) fills bin 4; a horizontal one (gx = 0, gy < 0: atan2 = pi)
    fills bin 0; the opposite edge falls in the same bin (unsigned)."""
    hog = HOGTarget(16, 8, 9)
    ramp = torch.zeros(1, 3, 16, 16)
    ramp[..., 8:] = 1.0  # dark left, bright right
    for img, expected in ((ramp, 4), (1 - ramp, 4), (ramp.transpose(2, 3), 0), (1 - ramp.transpose(2, 3), 0)):
        cells = hog(img).view(1, 4, 3, 9)  # (N, L=1 -> 4 cells, C, bins)
        assert torch.equal(cells.argmax(dim=-1).unique(), torch.tensor([expected]))
        assert torch.allclose(cells[..., expected], torch.ones(()))


def test_hog_handles_any_size_and_keeps_out_of_the_state_dict():
    hog = HOGTarget(8, 4, 9)
    assert hog(torch.randn(2, 3, 24, 24)).shape == (2, 9, 4 * 3 * 9)
    assert hog.state_dict() == {}


def hog_model(**kw):
    return mae_vit(
        "micro",
        patch_size=8,
        img_size=32,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_pix_loss=False,
        target="hog",
        **kw,
    )


def test_model_predicts_hog_and_learns_it():
    torch.manual_seed(0)
    model = hog_model()
    assert model.decoder_pred.out_features == 27  # 1 cell x 3 channels x 9 bins per 8-px patch
    pixel = mae_vit("micro", patch_size=8, img_size=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    assert set(model.state_dict()) == set(pixel.state_dict())  # same keys: the filters are no parameters
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    pixel.load_state_dict(encoder, strict=False)  # the encoder is the pixel model's: export and eval unchanged
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 16)
    out = model(imgs, noise=noise)
    assert out.pred.shape == (4, 16, 27)
    target = model.hog(imgs)
    mask = out.mask
    expected = (((out.pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(out.loss, expected)
    partial = model(imgs, noise=noise, decode_fraction=0.25)  # a share of the masked patches, HOG too
    assert partial.scored.sum() == 4 * 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(imgs, noise=noise).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_hog_needs_no_norm_pix_and_a_dividing_cell(tmp_path, mini_root):
    base = ["model.size=micro", "model.patch_size=8", "data.crop_size=32", f"data.root={mini_root}", "model.target=hog"]
    with pytest.raises(ConfigError, match="add model.norm_pix_loss=false"):
        load_pretrain_config(None, base)
    with pytest.raises(
        ConfigError, match="model.hog_cell_size 3 does not divide model.patch_size 8; use one of 1, 2, 4, 8"
    ):
        load_pretrain_config(None, base + ["model.norm_pix_loss=false", "model.hog_cell_size=3"])
    with pytest.raises(ConfigError, match="model.target"):
        load_pretrain_config(None, base[:-1] + ["model.target=hogs"])
    cfg = load_pretrain_config(None, base + ["model.norm_pix_loss=false"])
    assert (cfg.model.target, cfg.model.hog_cell_size, cfg.model.hog_bins) == ("hog", 8, 9)


def test_flops_count_the_hog_head():
    pixel = mae_train_flops_per_image("base", 224)
    hog = mae_train_flops_per_image("base", 224, target="hog")
    tokens = 1 + 196  # the decoder's tokens at the full share
    assert pixel - hog == pytest.approx(3 * 2 * tokens * 512 * (768 - 108))  # head: 16*16*3 -> 4 cells*3*9


# ----------------------------------------------------------------------------- a HOG run, end to end


@pytest.fixture(scope="module")
def hog_run(tmp_path_factory, mini_root):
    """A real HOG-target pretraining of the CPU recipe, 2 epochs with the monitor's grids (in-process, seconds)."""
    from helpers import CPU_RECIPE, in_process_run

    from mae_et.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("hog_run")
    with in_process_run():
        cfg = load_pretrain_config(
            CPU_RECIPE,
            [
                f"data.root={mini_root}",
                f"output_dir={out}",
                "train.epochs=2",
                "model.target=hog",
                "model.norm_pix_loss=false",
                "tracking.recon_every_epochs=1",
            ],
        )
        result = pretrain(cfg)
    return result.run_dir


def test_hog_run_shows_glyphs_and_its_encoder_evaluates_unchanged(hog_run, mini_root, tmp_path, capsys):
    from mae_et.evaluate.export import main as export_main
    from mae_et.evaluate.visualize import load_mae
    from mae_et.evaluate.visualize import main as visualize_main
    from mae_et.models.vit import encoder_features, load_pretrained_vit

    mae, cfg = load_mae(hog_run)
    assert cfg.model.target == "hog" and mae.decoder_pred.out_features == 27
    # the monitor's grids: 4 panels, the last two glyphs (grey: R = G = B), the two not identical
    pngs = sorted((hog_run / "reconstructions").glob("*.png"))
    assert pngs
    grid = np.asarray(Image.open(pngs[-1]))
    side, pad = 48, 2  # the CPU recipe's crop at the end of its et schedule; make_grid's padding
    pred_panel = grid[pad : pad + side, pad + 2 * (side + pad) : pad + 2 * (side + pad) + side]
    target_panel = grid[pad : pad + side, pad + 3 * (side + pad) : pad + 3 * (side + pad) + side]
    for panel in (pred_panel, target_panel):
        assert (panel[..., 0] == panel[..., 1]).all() and panel.max() > 100
    assert not np.array_equal(pred_panel, target_panel)
    # the visualize CLI says what the panels are
    out = tmp_path / "hog.png"
    images = [str(p) for p in sorted((mini_root / "val").rglob("*.JPEG"))[:2]]
    visualize_main([str(hog_run), *images, "--out", str(out)])
    assert "(original | masked | predicted HOG | target HOG)" in capsys.readouterr().out
    width, height = Image.open(out).size  # two images of four panels, upscaled, with a strip of column titles
    assert width >= 800 and height > 2 * width * (side + pad) / (4 * (side + pad) + pad)
    # the encoder is the pixel model's: fine-tune, probe and kNN load it (load_pretrained_vit), export writes it
    vit, _ = load_pretrained_vit(hog_run)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder_features(vit.eval(), x, "cls"), mae.forward_features(x)[:, 0], atol=1e-5, rtol=0
        )
    assert export_main([str(hog_run), str(tmp_path / "enc.safetensors")]) == 0


def test_hog_glyphs_draw_the_edge_direction():
    """A vertical edge's HOG (bin 4) draws a vertical line in each cell, a horizontal one's (bin 0) a horizontal
    line."""
    hog = HOGTarget(16, 16, 9)
    ramp = torch.zeros(1, 3, 16, 16)
    ramp[..., 8:] = 1.0
    from mae_et.models.hog import hog_glyphs

    vertical = hog_glyphs(hog(ramp), 1, 16, 16)[0, 0]  # (16, 16)
    horizontal = hog_glyphs(hog(ramp.transpose(2, 3)), 1, 16, 16)[0, 0]
    assert vertical.sum(dim=0).argmax() in (7, 8) and vertical.sum(dim=1).std() < vertical.sum(dim=0).std()
    assert horizontal.sum(dim=1).argmax() in (7, 8) and horizontal.sum(dim=0).std() < horizontal.sum(dim=1).std()


def test_both_histogram_paths_agree(mini_root):
    """The CPU's scatter_add_ and the masked sums CUDA uses (deterministic there) give the same histograms."""
    hog = HOGTarget(8, 4, 9)
    magnitude = torch.rand(2, 3, 4, 4, 16)
    bins = torch.randint(0, 9, (2, 3, 4, 4, 16))
    torch.testing.assert_close(
        hog.histogram(magnitude, bins, scatter=True), hog.histogram(magnitude, bins, scatter=False)
    )
