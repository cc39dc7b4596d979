"""The shared training step: compiled bf16 == eager fp32 on the same batch; one graph per size."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from helpers import reset_accelerate

from mae_et.models.mae import mae_vit
from mae_et.train.optim import build_adamw
from mae_et.train.step import TrainStep


def make_step(precision: str, compile_mode: str, seed: int = 0, sizes=(32, 48)):
    reset_accelerate()
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    torch.manual_seed(seed)
    model = mae_vit(
        "micro",
        patch_size=8,
        img_size=48,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_pix_loss=True,
    )
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainStep(
        accelerator,
        model,
        optimizer,
        mask_ratio=0.75,
        frequency_mode="fft",
        clip_grad=None,
        compile_mode=compile_mode,
        sizes=sizes,
        compile_backend="aot_eager",
    ), model  # inductor's CPU codegen takes minutes here; the GPU benchmark uses it


def batch(size=48, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return images


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_compiled_bf16_step_matches_eager_fp32():
    torch._dynamo.reset()
    eager, _ = make_step("no", "none")
    compiled, _ = make_step("bf16", "default")
    images = batch()
    for size in (32, 48):  # two curriculum sizes: two graphs
        noise = torch.rand(8, (size // 8) ** 2, generator=torch.Generator().manual_seed(size))
        a = eager(images, size, noise).loss
        b = compiled(images, size, noise).loss
        torch.testing.assert_close(b.float(), a, rtol=3e-2, atol=3e-2)


def test_no_recompile_inside_a_stage():
    torch._dynamo.reset()
    step, _ = make_step("no", "default")
    images = batch()
    from torch._dynamo.utils import counters

    counters.clear()
    for i in range(3):
        for size in (32, 48):
            noise = torch.rand(8, (size // 8) ** 2)
            step(images, size, noise)
        if i == 0:
            after_first_round = dict(counters["stats"])
    assert (
        counters["stats"]["unique_graphs"] == after_first_round["unique_graphs"]
    )  # nothing new after each size was seen once


@pytest.mark.parametrize("poison", ["weight", "gradient"])
def test_nonfinite_grads_skip_the_update_on_the_device(poison):
    """A NaN in one weight (the loss and every gradient turn NaN) or in one parameter's gradient only: the step
    reports it, and neither the weights nor the optimizer's moments and step count move."""
    step, model = make_step("no", "none")
    images = batch()
    noise = torch.rand(8, 36)
    step(images, 48, noise)  # one normal update creates the optimizer state
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(step.raw_optimizer.state_dict())
    handle = None
    if poison == "weight":
        with torch.no_grad():
            model.decoder_pred.weight[0, 0] = float("nan")
    else:
        handle = model.decoder_pred.weight.register_hook(lambda g: g * float("nan"))
    result = step(images, 48, noise)
    if handle is not None:
        handle.remove()
    assert bool(result.nonfinite)
    if poison == "weight":
        assert not torch.isfinite(result.loss)  # the poison was in effect for the step
        with torch.no_grad():  # the planted NaN itself is all that differs; put it back for the comparison
            model.decoder_pred.weight[0, 0] = before["decoder_pred.weight"][0, 0]
    else:
        assert torch.isfinite(result.loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after_state = step.raw_optimizer.state_dict()["state"]
    assert after_state.keys() == opt_before["state"].keys()
    for key, s_before in opt_before["state"].items():
        s_after = after_state[key]
        assert torch.equal(s_after["exp_avg"], s_before["exp_avg"]) and torch.equal(s_after["step"], s_before["step"])
        assert torch.equal(s_after["exp_avg_sq"], s_before["exp_avg_sq"])


def test_mask_noise_is_a_pure_function_distinct_for_every_rank_and_micro_step():
    """Seeded by a hash of (seed, step, micro-step, rank): no two of 512 ranks x 4 micro-steps share a mask, where
    the old linear seed (... + micro * 131 + rank) gave micro 1 / rank 0 the mask of micro 0 / rank 131."""
    from mae_et.train.pretrain import mask_noise

    cpu = torch.device("cpu")
    assert torch.equal(mask_noise(3, 7, 1, 5, (2, 16), cpu), mask_noise(3, 7, 1, 5, (2, 16), cpu))
    assert not torch.equal(mask_noise(0, 0, 1, 0, (2, 16), cpu), mask_noise(0, 0, 0, 131, (2, 16), cpu))
    firsts = {
        tuple(mask_noise(0, 10, micro, rank, (1, 4), cpu)[0].tolist()) for micro in range(4) for rank in range(512)
    }
    assert len(firsts) == 4 * 512
    assert not torch.equal(mask_noise(0, 1, 0, 0, (2, 16), cpu), mask_noise(1, 1, 0, 0, (2, 16), cpu))
