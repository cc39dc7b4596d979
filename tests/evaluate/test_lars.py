"""LARS against hand computations (float64, so the numbers below are exact to ~1e-15)."""

from __future__ import annotations

import pytest
import torch

from mae_et.evaluate.lars import LARS

TC = 0.001  # trust coefficient
WD = 0.1
LR = 2.0
MOM = 0.9


def make_params():
    w = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    return w, b


def set_grads(w, b):
    w.grad = torch.tensor([[0.3, 0.0], [0.0, 0.4]], dtype=torch.float64)
    b.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)


def test_one_and_two_steps_match_hand_computation():
    w, b = make_params()
    opt = LARS([w, b], lr=LR, weight_decay=WD, momentum=MOM, trust_coefficient=TC)

    # ---- step 1
    set_grads(w, b)
    opt.step()
    # weight: g = grad + wd*w = [[0.3+0.3, 0], [0, 0.4+0.4]] = [[0.6, 0], [0, 0.8]], ||g|| = 1
    #         ratio = 0.001 * 5 / 1 = 0.005;  mu1 = 0.005 * g = [[0.003, 0], [0, 0.004]]
    #         w1 = w - 2 * mu1 = [[2.994, 0], [0, 3.992]]
    torch.testing.assert_close(w.data, torch.tensor([[2.994, 0.0], [0.0, 3.992]], dtype=torch.float64))
    # bias: no wd, no ratio: mu1 = [0.5, 0.5];  b1 = [1, -2] - 2 * 0.5 = [0, -3]
    torch.testing.assert_close(b.data, torch.tensor([0.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(opt.state[w]["mu"], torch.tensor([[0.003, 0.0], [0.0, 0.004]], dtype=torch.float64))
    assert torch.equal(w.grad, torch.tensor([[0.3, 0.0], [0.0, 0.4]], dtype=torch.float64))  # grad left as it was

    # ---- step 2, same raw gradients
    set_grads(w, b)
    opt.step()
    # weight: w1 = 0.998 * w, so ||w1|| = 0.998 * 5 = 4.99; g = grad + 0.1 * w1 = [[0.5994, 0], [0, 0.7992]],
    #         ||g|| = 0.999 * ||[0.6, 0.8]|| = 0.999
    #         ratio = 0.001 * 4.99 / 0.999;  ratio * g = 0.001 * 4.99 * [[0.6, 0], [0, 0.8]]
    #                                                  = [[0.002994, 0], [0, 0.003992]]
    #         mu2 = 0.9 * mu1 + ratio * g = [[0.0027 + 0.002994, 0], [0, 0.0036 + 0.003992]]
    #                                     = [[0.005694, 0], [0, 0.007592]]
    #         w2 = w1 - 2 * mu2 = [[2.994 - 0.011388, 0], [0, 3.992 - 0.015184]] = [[2.982612, 0], [0, 3.976816]]
    torch.testing.assert_close(
        opt.state[w]["mu"], torch.tensor([[0.005694, 0.0], [0.0, 0.007592]], dtype=torch.float64)
    )
    torch.testing.assert_close(w.data, torch.tensor([[2.982612, 0.0], [0.0, 3.976816]], dtype=torch.float64))
    # bias: mu2 = 0.9 * 0.5 + 0.5 = 0.95;  b2 = [0, -3] - 2 * 0.95 = [-1.9, -4.9]
    torch.testing.assert_close(b.data, torch.tensor([-1.9, -4.9], dtype=torch.float64))


def test_zero_gradient_cases():
    # No wd, zero gradient: ||g|| = 0 -> ratio 1, g = 0: nothing moves, momentum stays 0.
    w, b = make_params()
    opt = LARS([w, b], lr=LR, weight_decay=0.0, momentum=MOM, trust_coefficient=TC)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    assert torch.equal(w.data, make_params()[0].data) and torch.equal(b.data, make_params()[1].data)
    assert torch.equal(opt.state[w]["mu"], torch.zeros_like(w))
    assert not torch.isnan(w).any()

    # With wd, zero gradient: g = wd*w, ratio = tc*||w|| / (wd*||w||) = tc/wd, so ratio*g = tc*w:
    # w1 = w - lr * tc * w = 0.998 * w (independent of wd).
    w, _ = make_params()
    opt = LARS([w], lr=LR, weight_decay=WD, momentum=MOM, trust_coefficient=TC)
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.data, 0.998 * make_params()[0].data)

    # Zero weights: ||p|| = 0 -> ratio 1, a plain momentum-SGD step on the gradient.
    z = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([z], lr=0.5, weight_decay=WD, momentum=MOM, trust_coefficient=TC)
    z.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(z.data, torch.full((2, 2), -0.5, dtype=torch.float64))


def test_params_without_grad_are_skipped_and_bad_args_rejected():
    w, b = make_params()
    opt = LARS([w, b], lr=LR, weight_decay=WD)
    w.grad = torch.ones_like(w)
    opt.step()  # b has no grad: untouched, no state
    assert b not in opt.state and torch.equal(b.data, make_params()[1].data)
    with pytest.raises(ValueError, match="momentum"):
        LARS([w], momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        LARS([w], lr=-1.0)
