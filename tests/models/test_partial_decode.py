"""Partial reconstruction (model.decode_fraction): the decoder runs on the visible patches plus a chosen share of the
masked ones, picked by the mask's own noise; the loss is the mean over those; the full share is the reference model."""

from __future__ import annotations

import pytest
import torch

from mae_et.models.flops import mae_forward_flops, mae_train_flops_per_image
from mae_et.models.mae import MaskedAutoencoderViT, decoded_count, mae_vit


def micro(norm_pix_loss: bool = True, img_size: int = 64) -> MaskedAutoencoderViT:
    return mae_vit(
        "micro",
        patch_size=8,
        img_size=img_size,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=2,
        norm_pix_loss=norm_pix_loss,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_decoded_count():
    assert decoded_count(64, 0.75, 1.0) == (16, 48)  # every masked patch
    assert decoded_count(64, 0.75, 0.75) == (16, 48)  # a share >= the mask ratio is every masked patch too
    assert decoded_count(64, 0.75, 0.25) == (16, 16)  # CrossMAE's kept mask ratio 0.25: a third of the masked
    assert decoded_count(196, 0.75, 0.25) == (49, 49)
    assert decoded_count(9, 0.75, 0.25) == (2, 2)  # etpp's 24 px stage at patch 8
    assert decoded_count(9, 0.75, 0.01) == (2, 1)  # never none


def manual_partial_loss(model: MaskedAutoencoderViT, imgs: torch.Tensor, noise: torch.Tensor, keep: int, decode: int):
    """Per image, by hand: the decoder on cls + the visible + the `decode` lowest-noise masked patches (in patch
    order, each with its own position), the loss the mean over those masked ones. Written without the model's
    gathers."""
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)  # (N, 1+keep, D)
    n, num_patches = noise.shape
    grid = int(num_patches**0.5)
    pos = model._pos_embed("dec", grid)[0]  # (1+L, Dd)
    target = model.patchify(imgs)  # (N, L, ppC)
    losses = []
    for i in range(n):
        order = noise[i].argsort().tolist()
        visible, chosen = order[:keep], order[keep : keep + decode]
        emb = model.decoder_embed(latent[i : i + 1])[0]  # (1+keep, Dd)
        slot = {patch: emb[1 + j] for j, patch in enumerate(visible)}
        patches = sorted(visible + chosen)
        tokens = [emb[0] + pos[0]] + [(slot[q] if q in slot else model.mask_token[0, 0]) + pos[1 + q] for q in patches]
        x = torch.stack(tokens).unsqueeze(0)  # (1, 1+K, Dd)
        for blk in model.decoder_blocks:
            x = blk(x)
        pred = model.decoder_pred(model.decoder_norm(x))[0, 1:]  # (K, ppC)
        for row, q in enumerate(patches):
            if q in chosen:
                t = target[i, q]
                t = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
                losses.append(((pred[row] - t) ** 2).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_partial_decoder_is_the_described_computation(fraction):
    model = micro()
    imgs, noise = torch.randn(3, 3, 64, 64), torch.rand(3, 64)
    keep, decode = decoded_count(64, 0.75, fraction)
    seen = []
    hook = model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    out = model(imgs, mask_ratio=0.75, noise=noise, decode_fraction=fraction)
    hook.remove()
    assert seen == [(3, 1 + keep + decode, 32)]  # the decoder ran on cls + visible + chosen only
    torch.testing.assert_close(out.loss, manual_partial_loss(model, imgs, noise, keep, decode), rtol=1e-5, atol=1e-6)
    # the scored patches are the `decode` masked ones of lowest noise, and only masked ones
    ranks = noise.argsort(dim=1).argsort(dim=1)  # (N, L) position of each patch in the shuffle
    expected = ((ranks >= keep) & (ranks < keep + decode)).float()
    assert torch.equal(out.scored, expected) and torch.equal(out.scored * (1 - out.mask), torch.zeros_like(out.mask))
    # pred holds the decoded patches in place, zeros where the decoder did not run
    decoded = ranks < keep + decode
    assert (out.pred[~decoded] == 0).all() and (out.pred[decoded].abs().sum(-1) > 0).all()


def test_loss_is_the_mean_over_the_chosen_patches():
    model = micro()
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    out = model(imgs, mask_ratio=0.75, noise=noise, decode_fraction=0.25)
    target = model.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out.pred - target) ** 2).mean(-1)  # (N, L)
    torch.testing.assert_close(out.loss, (per_patch * out.scored).sum() / out.scored.sum())


@pytest.mark.parametrize("norm_pix", [False, True])
def test_full_share_is_the_reference_model_bit_for_bit(norm_pix):
    """decode_fraction 1.0 runs the reference decoder; and the partial code path itself, asked for every patch, gives
    the same loss, prediction and gradients bit for bit (same tokens in the same order)."""
    model = micro(norm_pix)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)

    def run(decode_all_by_partial_path: bool):
        model.zero_grad(set_to_none=True)
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
        if decode_all_by_partial_path:
            ids = model.decode_ids(ids_restore, 16, 48)  # (N, L): every patch, ascending
            assert torch.equal(ids, torch.arange(64).expand(2, -1))
            pred = model.forward_decoder(latent, ids_restore, ids)
            loss = model.forward_loss(imgs, pred, mask, ids)
        else:
            pred = model.forward_decoder(latent, ids_restore)
            loss = model.forward_loss(imgs, pred, mask)
        loss.backward()
        return loss.detach(), pred.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_loss, ref_pred, ref_grads = run(False)
    loss, pred, grads = run(True)
    assert torch.equal(loss, ref_loss) and torch.equal(pred, ref_pred)
    assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
    out = model(imgs, 0.75, noise, decode_fraction=1.0)
    assert torch.equal(out.loss.detach(), ref_loss) and out.scored is None
    assert torch.equal(model(imgs, 0.75, noise).loss.detach(), ref_loss)


def test_choice_is_a_pure_function_of_the_noise():
    model = micro()
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    a = model(imgs, 0.75, noise.clone(), decode_fraction=0.25)
    torch.manual_seed(123)  # the global generator plays no part
    b = model(imgs, 0.75, noise.clone(), decode_fraction=0.25)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.scored, b.scored)
    c = model(imgs, 0.75, torch.rand(2, 64), decode_fraction=0.25)
    assert not torch.equal(a.scored, c.scored)


def test_same_weights_as_the_full_decoder():
    """No new parameter: a state dict (so an official checkpoint) loads whatever share a run trains with."""
    full, partial = micro(), micro()
    partial.load_state_dict(full.state_dict(), strict=True)
    imgs, noise = torch.randn(1, 3, 64, 64), torch.rand(1, 64)
    assert torch.isfinite(partial(imgs, 0.75, noise, decode_fraction=0.25).loss)


def test_flops_count_the_decoded_tokens():
    full = mae_forward_flops(64, 8, 192, 12, 128, 2)
    quarter = mae_forward_flops(64, 8, 192, 12, 128, 2, decode_fraction=0.25)
    decoder_zero = mae_forward_flops(64, 8, 192, 12, 128, 0)  # encoder + embed + pred only
    # decoder blocks: 65 tokens at full share, 1 + 16 + 16 = 33 at a quarter
    from mae_et.models.flops import transformer_block_flops

    assert full - quarter == pytest.approx(
        2 * (transformer_block_flops(65, 128) - transformer_block_flops(33, 128)) + 2 * (65 - 33) * 128 * 192
    )
    assert decoder_zero < quarter < full
    assert mae_train_flops_per_image("tiny", 64, 8, 128, 2, decode_fraction=0.25) == 3 * quarter
    # ViT-B/16 at 224 with MAE's decoder: a quarter share (99 of 197 decoder tokens) saves about a quarter of the step
    b_full, b_quarter = (
        mae_train_flops_per_image("base", 224),
        mae_train_flops_per_image("base", 224, decode_fraction=0.25),
    )
    assert 1.3 < b_full / b_quarter < 1.45


def test_share_of_the_full_size_keeps_the_full_size_count_at_every_stage():
    """model.decode_fraction_of=full_size: the share is of the full crop's patches (64 at 64 px, patch 8), so each
    curriculum stage decodes that count per image, capped at its own masked patches."""
    assert decoded_count(9, 0.75, 0.25, of_patches=64) == (2, 7)  # 24 px: every masked patch
    assert decoded_count(36, 0.75, 0.25, of_patches=64) == (9, 16)  # 48 px: 16 of 27, not 9
    assert decoded_count(49, 0.75, 0.25, of_patches=64) == (12, 16)  # 56 px
    assert decoded_count(64, 0.75, 0.25, of_patches=64) == decoded_count(64, 0.75, 0.25)  # the full size: same
    assert decoded_count(36, 0.75, 0.25, of_patches=None) == (9, 9)  # stage (the default): B's own patches


def test_model_decodes_the_full_size_count_at_a_reduced_size():
    model = micro()  # img_size 64: the full crop
    imgs, noise = torch.randn(2, 3, 48, 48), torch.rand(2, 36)
    seen = []
    hook = model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    out = model(imgs, 0.75, noise, decode_fraction=0.25, decode_of_patches=64)
    stage = model(imgs, 0.75, noise, decode_fraction=0.25)
    hook.remove()
    assert seen == [(2, 1 + 9 + 16, 32), (2, 1 + 9 + 9, 32)]
    torch.testing.assert_close(out.loss, manual_partial_loss(model, imgs, noise, 9, 16), rtol=1e-5, atol=1e-6)
    assert out.scored.sum(1).tolist() == [16.0, 16.0] and stage.scored.sum(1).tolist() == [9.0, 9.0]
    # at 24 px the full size's 16 exceed the 7 masked patches: the reference decoder, bit for bit
    small, small_noise = torch.randn(2, 3, 24, 24), torch.rand(2, 9)
    capped = model(small, 0.75, small_noise, decode_fraction=0.25, decode_of_patches=64)
    reference = model(small, 0.75, small_noise)
    assert capped.scored is None and torch.equal(capped.loss, reference.loss)


def test_flops_count_the_full_size_share_at_a_reduced_size():
    from mae_et.models.flops import transformer_block_flops

    stage = mae_forward_flops(48, 8, 192, 12, 128, 2, decode_fraction=0.25)  # 1 + 9 + 9 decoder tokens
    of_full = mae_forward_flops(48, 8, 192, 12, 128, 2, decode_fraction=0.25, decode_of_size=64)  # 1 + 9 + 16
    assert of_full - stage == pytest.approx(
        2 * (transformer_block_flops(26, 128) - transformer_block_flops(19, 128)) + 2 * 7 * 128 * 192
    )
    assert mae_forward_flops(64, 8, 192, 12, 128, 2, decode_fraction=0.25, decode_of_size=64) == mae_forward_flops(
        64, 8, 192, 12, 128, 2, decode_fraction=0.25
    )
    assert mae_forward_flops(24, 8, 192, 12, 128, 2, decode_fraction=0.25, decode_of_size=64) == mae_forward_flops(
        24, 8, 192, 12, 128, 2
    )  # capped: every masked patch
    assert mae_train_flops_per_image("tiny", 48, 8, 128, 2, decode_fraction=0.25, decode_of_size=64) == 3 * of_full
