"""Tests for mae_et.models.mae (CPU, micro models, a few seconds in total)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mae_et.models.mae import MODEL_SIZES, MAEOutput, MaskedAutoencoderViT, get_2d_sincos_pos_embed, mae_vit
from mae_et.models.start import load_official_mae_checkpoint

# Micro configuration shared by most tests: encoder 64 wide / 2 deep / 2 heads,
# decoder 32 wide / 1 deep / 2 heads, patch 8 (so p*p*3 = 192).
P = 8
D, DEPTH, HEADS = 64, 2, 2
DD, DDEPTH, DHEADS = 32, 1, 2
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def micro(norm_pix_loss: bool = False, img_size: int = 32) -> MaskedAutoencoderViT:
    return mae_vit(
        "micro",
        patch_size=P,
        img_size=img_size,
        decoder_embed_dim=DD,
        decoder_depth=DDEPTH,
        decoder_num_heads=DHEADS,
        norm_pix_loss=norm_pix_loss,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------
# Independent references written from the description of facebookresearch/mae
# --------------------------------------------------------------------------------------
def np_sincos_2d(embed_dim: int, g: int, cls_token: bool = True) -> np.ndarray:
    grid_h = np.arange(g, dtype=np.float64)
    grid_w = np.arange(g, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, 'xy' indexing
    grid = np.stack(grid, axis=0).reshape(2, 1, g, g)

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def expected_keys(depth: int, decoder_depth: int) -> set[str]:
    sub = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    keys = {"cls_token", "mask_token"}
    for mod in ["patch_embed.proj", "norm", "decoder_embed", "decoder_norm", "decoder_pred"]:
        keys |= {f"{mod}.weight", f"{mod}.bias"}
    for prefix, n in [("blocks", depth), ("decoder_blocks", decoder_depth)]:
        for i in range(n):
            for s in sub:
                keys |= {f"{prefix}.{i}.{s}.weight", f"{prefix}.{i}.{s}.bias"}
    return keys


def random_official_sd(grid: int) -> dict[str, torch.Tensor]:
    """An official-style MAE state dict with random (non-trivial) values, built from names."""
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=0.1, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd = {
        "cls_token": rnd(1, 1, D, scale=0.02),
        "mask_token": rnd(1, 1, DD, scale=0.02),
        "pos_embed": torch.from_numpy(np_sincos_2d(D, grid)).float().unsqueeze(0),
        "decoder_pos_embed": torch.from_numpy(np_sincos_2d(DD, grid)).float().unsqueeze(0),
        "patch_embed.proj.weight": rnd(D, 3, P, P, scale=0.05),
        "patch_embed.proj.bias": rnd(D),
        "norm.weight": rnd(D, offset=1.0),
        "norm.bias": rnd(D),
        "decoder_embed.weight": rnd(DD, D, scale=0.15),
        "decoder_embed.bias": rnd(DD),
        "decoder_norm.weight": rnd(DD, offset=1.0),
        "decoder_norm.bias": rnd(DD),
        "decoder_pred.weight": rnd(P * P * 3, DD, scale=0.2),
        "decoder_pred.bias": rnd(P * P * 3),
    }
    for prefix, n, dim in [("blocks", DEPTH, D), ("decoder_blocks", DDEPTH, DD)]:
        for i in range(n):
            b = f"{prefix}.{i}."
            sd[b + "norm1.weight"] = rnd(dim, offset=1.0)
            sd[b + "norm1.bias"] = rnd(dim)
            sd[b + "attn.qkv.weight"] = rnd(3 * dim, dim, scale=dim**-0.5)
            sd[b + "attn.qkv.bias"] = rnd(3 * dim)
            sd[b + "attn.proj.weight"] = rnd(dim, dim, scale=dim**-0.5)
            sd[b + "attn.proj.bias"] = rnd(dim)
            sd[b + "norm2.weight"] = rnd(dim, offset=1.0)
            sd[b + "norm2.bias"] = rnd(dim)
            sd[b + "mlp.fc1.weight"] = rnd(4 * dim, dim, scale=dim**-0.5)
            sd[b + "mlp.fc1.bias"] = rnd(4 * dim)
            sd[b + "mlp.fc2.weight"] = rnd(dim, 4 * dim, scale=(4 * dim) ** -0.5)
            sd[b + "mlp.fc2.bias"] = rnd(dim)
    return sd


def ref_mae_loss(sd: dict, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float, norm_pix: bool) -> torch.Tensor:
    """Plain-torch MAE forward (no timm), float64, following the reference step by step."""
    w = {k: v.double() for k, v in sd.items()}
    x_img = imgs.double()
    n = x_img.shape[0]

    def ln(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def lin(x, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    def block(x, prefix, heads):
        t, dim = x.shape[1], x.shape[2]
        hd = dim // heads
        qkv = lin(ln(x, prefix + ".norm1"), prefix + ".attn.qkv")
        qkv = qkv.reshape(n, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(n, t, dim)
        x = x + lin(a, prefix + ".attn.proj")
        h = lin(ln(x, prefix + ".norm2"), prefix + ".mlp.fc1")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
        return x + lin(h, prefix + ".mlp.fc2")

    # encoder
    x = F.conv2d(x_img, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=P)
    x = x.flatten(2).transpose(1, 2)
    x = x + w["pos_embed"][:, 1:, :]
    L = x.shape[1]
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(n, L, dtype=torch.float64)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = w["cls_token"] + w["pos_embed"][:, :1, :]
    x = torch.cat([cls.expand(n, -1, -1), x], dim=1)
    for i in range(DEPTH):
        x = block(x, f"blocks.{i}", HEADS)
    x = ln(x, "norm")
    # decoder
    x = lin(x, "decoder_embed")
    mask_tokens = w["mask_token"].repeat(n, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, DD))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + w["decoder_pos_embed"]
    for i in range(DDEPTH):
        x = block(x, f"decoder_blocks.{i}", DHEADS)
    x = ln(x, "decoder_norm")
    pred = lin(x, "decoder_pred")[:, 1:, :]
    # loss
    h = x_img.shape[2] // P
    target = x_img.reshape(n, 3, h, P, h, P)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(n, h * h, P * P * 3)
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------
def test_state_dict_keys_match_reference_names():
    model = micro()
    sd = model.state_dict()
    assert set(sd) == expected_keys(DEPTH, DDEPTH)
    assert not any("pos_embed" in k for k in sd)
    assert sd["cls_token"].shape == (1, 1, D)
    assert sd["mask_token"].shape == (1, 1, DD)
    assert sd["patch_embed.proj.weight"].shape == (D, 3, P, P)
    assert sd["decoder_pred.weight"].shape == (P * P * 3, DD)
    assert model.no_weight_decay() == {"cls_token", "mask_token"}


def test_model_sizes_and_factory():
    assert MODEL_SIZES["base"]["embed_dim"] == 768 and MODEL_SIZES["base"]["num_heads"] == 12
    assert MODEL_SIZES["huge"]["patch_size"] == 14
    m = mae_vit("micro", decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)
    assert m.patch_size == 16 and len(m.blocks) == 2 and m.embed_dim == 64


def test_every_preset_splits_into_its_heads_and_its_sincos_parts():
    """The encoder presets hold what the schema checks of the decoder (mae_et.train.config.check_heads)."""
    for size, dims in MODEL_SIZES.items():
        assert dims["embed_dim"] % dims["num_heads"] == 0 and dims["embed_dim"] % 4 == 0, size


def test_initialisation_like_reference():
    model = micro()
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert 0.005 < model.cls_token.std().item() < 0.05
    # xavier_uniform bound on the (D, 3*p*p) view of the conv weight
    bound = math.sqrt(6.0 / (D + 3 * P * P))
    wmax = model.patch_embed.proj.weight.abs().max().item()
    assert bound * 0.8 < wmax <= bound


# --------------------------------------------------------------------------------------
# Shapes, masking
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [32, 48, 64])
def test_any_input_size(side):
    model = micro()
    imgs = torch.randn(2, 3, side, side)
    out = model(imgs, mask_ratio=0.75)
    L = (side // P) ** 2
    assert isinstance(out, MAEOutput)
    assert out.pred.shape == (2, L, P * P * 3)
    assert out.mask.shape == (2, L) and out.ids_restore.shape == (2, L)
    assert torch.all(out.mask.sum(1) == L - int(L * 0.25))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model.unpatchify(model.patchify(imgs)).equal(imgs)


def test_bad_inputs_raise():
    model = micro()
    with pytest.raises(ValueError, match=r"36.*8"):
        model(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 32, 40))


def test_fixed_noise_is_deterministic_and_keeps_lowest_noise():
    model = micro()
    imgs = torch.randn(3, 3, 32, 32)
    L = 16
    # Noise as a random permutation of k/L: the kept patches are exactly those with k < len_keep.
    noise = torch.stack([torch.randperm(L) for _ in range(3)]).float() / L  # (3, L)
    a = model(imgs, mask_ratio=0.75, noise=noise)
    b = model(imgs, mask_ratio=0.75, noise=noise)
    assert a.mask.equal(b.mask) and a.loss.equal(b.loss)
    len_keep = int(L * 0.25)
    expected_mask = (noise >= len_keep / L).float()
    assert a.mask.equal(expected_mask)
    # A different noise gives a different mask (sanity check that noise is used at all).
    c = model(imgs, mask_ratio=0.75, noise=1 - noise)
    assert not c.mask.equal(a.mask)


def test_random_masking_gathers_kept_tokens():
    model = micro()
    x = torch.randn(2, 16, 5)
    noise = torch.rand(2, 16)
    kept, mask, ids_restore = model.random_masking(x, 0.75, noise)
    assert kept.shape == (2, 4, 5)
    for i in range(2):
        idx = torch.nonzero(mask[i] == 0).flatten()
        # kept order is by ascending noise
        order = idx[torch.argsort(noise[i, idx])]
        assert kept[i].equal(x[i, order])
    assert torch.argsort(ids_restore, 1).gather(1, ids_restore).equal(torch.arange(16).expand(2, 16))


# --------------------------------------------------------------------------------------
# Position embedding
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,grid", [(64, 4), (32, 6), (192, 14), (768, 14), (1024, 16), (8, 1)])
def test_sincos_matches_numpy_reference(dim, grid):
    ours = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    ref = np_sincos_2d(dim, grid)
    assert ours.dtype == torch.float32 and ours.shape == (1 + grid * grid, dim)
    np.testing.assert_allclose(ours.numpy(), ref.astype(np.float32), rtol=0, atol=1e-7)
    assert torch.all(ours[0] == 0)
    no_cls = get_2d_sincos_pos_embed(dim, grid, cls_token=False)
    assert no_cls.equal(ours[1:])


def test_extent_positions_span_the_full_image_at_a_reduced_size():
    """pos_embed=extent: at B < crop the g patch centres sit at fractional positions of the full G-grid, so a
    location keeps its code across curriculum stages; at full size the table is the reference's."""
    dim, G = 32, 8
    assert torch.equal(get_2d_sincos_pos_embed(dim, G, extent=G), get_2d_sincos_pos_embed(dim, G))
    g = 4  # half the side: patch i covers full-grid patches 2i and 2i+1, centre 2i + 0.5
    extent = get_2d_sincos_pos_embed(dim, g, extent=G)[1:]  # (g*g, D)
    grid = get_2d_sincos_pos_embed(dim, g)[1:]
    assert not torch.allclose(extent, grid)
    # row-major (h, w): token h*g + w; the first half of the dims encodes w, the second half h (reference quirk)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    for h, w in ((0, 0), (1, 3), (3, 2)):
        pw, ph = 2 * w + 0.5, 2 * h + 0.5
        expect = torch.cat([torch.sin(pw * omega), torch.cos(pw * omega), torch.sin(ph * omega), torch.cos(ph * omega)])
        assert torch.allclose(extent[h * g + w].double(), expect, atol=1e-6)
    # the model uses it at reduced sizes only
    grid_model = MaskedAutoencoderViT(
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    extent_model = MaskedAutoencoderViT(
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        pos_embed="extent",
    )
    assert torch.equal(grid_model._pos_embed("enc", 8), extent_model._pos_embed("enc", 8))
    assert not torch.equal(grid_model._pos_embed("enc", 4), extent_model._pos_embed("enc", 4))
    assert torch.allclose(extent_model._pos_embed("enc", 4)[0, 1:], extent)
    out = extent_model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    assert out.pred.shape == (2, 16, 8 * 8 * 3) and torch.isfinite(out.loss)


def test_pos_embed_is_cached_and_not_a_parameter():
    model = micro()
    assert not any("pos" in n for n, _ in model.named_parameters())
    assert not any("pos" in n for n, _ in model.named_buffers())
    t1 = model._pos_embed("enc", 4)
    t2 = model._pos_embed("enc", 4)
    assert t1 is t2 and t1.shape == (1, 17, D)
    assert model._pos_embed("dec", 6).shape == (1, 37, DD)


# --------------------------------------------------------------------------------------
# Parity with an independent reference + checkpoint loading
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix", [False, True])
def test_parity_with_reference_forward(tmp_path, norm_pix):
    grid = 4
    sd = random_official_sd(grid)
    path = tmp_path / "mae_visualize_micro.pth"
    torch.save({"model": sd, "epoch": 0}, path)

    model = micro(norm_pix_loss=norm_pix)
    load_official_mae_checkpoint(model, str(path))
    model.eval()

    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, grid * grid)
    ref = ref_mae_loss(sd, imgs, noise, 0.75, norm_pix)
    out = model(imgs, mask_ratio=0.75, noise=noise)
    assert ref.item() > 0.01
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=0)
    # Train mode must give the same loss (no dropout / drop-path anywhere).
    model.train()
    torch.testing.assert_close(model(imgs, 0.75, noise).loss.double(), ref, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------
# forward_features, autocast
# --------------------------------------------------------------------------------------
def test_forward_features_unmasked_and_deterministic():
    model = micro()
    model.train()
    imgs = torch.randn(2, 3, 48, 48)
    L = 36
    f1 = model.forward_features(imgs)
    f2 = model.forward_features(imgs)
    assert f1.shape == (2, 1 + L, D)
    assert f1.equal(f2)
    # Same as the encoder with nothing dropped and the identity shuffle.
    noise = torch.arange(L).float().expand(2, L) / L
    latent, mask, _ = model.forward_encoder(imgs, 0.0, noise=noise)
    assert mask.sum() == 0
    torch.testing.assert_close(f1, latent, rtol=1e-5, atol=1e-6)


def test_loss_is_float32_under_autocast():
    model = micro(norm_pix_loss=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
