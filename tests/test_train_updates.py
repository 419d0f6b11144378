"""What one optimizer step does to the weights, checked against the arithmetic it stands for (mutation testing found
these were asserted only indirectly): the EMA is a lerp toward the new weights with weight 1 - decay, gradient
accumulation equals the whole batch (loss, grad norm, weights), clipping caps the applied gradient, and fp16's
grad scaler is undone before clipping and logging."""
import math

import pytest
import torch
from torch import nn

from backdrop.train.core import EMA, TrainConfig, Trainer

from test_train_core import Loader, NoNoise, Regression, _weights


class Halves:
    """The rows of Loader(2 n)'s batches, n at a time: grad_accum=2 x n sees what grad_accum=1 x 2 n does."""

    def __init__(self, n):
        self.whole, self.n, self.parts = Loader(2 * n), n, []

    def __next__(self):
        if not self.parts:
            x, y = next(self.whole)
            self.parts = [(x[:self.n], y[:self.n]), (x[self.n:], y[self.n:])]
        return self.parts.pop(0)


def test_the_ema_is_a_lerp_toward_the_new_weights(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, ema_decay=0.9)
    trainer = Trainer(Regression(), Loader(4), cfg, tmp_path, progress=False)
    for step in range(2):  # the warm-up's decay of the step just taken: decay_at(0), then decay_at(1)
        before = {k: v.clone() for k, v in trainer.ema.shadow.items()}
        trainer.train_step()
        d, now = EMA(nn.Linear(1, 1), 0.9).decay_at(step), _weights(trainer.module)
        for k in before:
            torch.testing.assert_close(trainer.ema.shadow[k], d * before[k] + (1 - d) * now[k])


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """Each micro-batch's loss is divided by grad_accum: unscaled, the logged loss and grad norm were doubled and
    grad_clip acted as grad_clip / grad_accum."""
    runs = {}
    for accum, batch, loader in ((1, 8, Loader(8)), (2, 4, Halves(4))):
        cfg = TrainConfig(steps=3, batch_size=batch, grad_accum=accum, lr=1e-2, grad_clip=0.05)
        trainer = Trainer(NoNoise(), loader, cfg, tmp_path / str(accum), progress=False)
        runs[accum] = [{k: float(v) for k, v in trainer.train_step().items()} for _ in range(3)], \
            _weights(trainer.module)
    (whole, w_whole), (accumulated, w_accumulated) = runs[1], runs[2]
    for a, b in zip(whole, accumulated):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    assert whole[0]["grad_norm"] > 0.05  # the clip acted
    for k in w_whole:
        torch.testing.assert_close(w_whole[k], w_accumulated[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clipping_caps_the_applied_gradient_after_unscaling(tmp_path, precision):
    """grad_clip bounds the gradient the optimizer applies; under fp16 it and the logged norm see the gradient
    with the loss scale (65536) undone, as fp32's."""
    trainer = Trainer(NoNoise(), Loader(4), TrainConfig(steps=20, batch_size=4, lr=1e-2, grad_clip=1e-3,
                                                         precision=precision), tmp_path, progress=False)
    for skipped in range(20):  # fp16: the scaler skips the steps whose scaled gradients overflow (weights unchanged)
        if math.isfinite(norm := float(trainer.train_step()["grad_norm"])):
            break
    applied = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.module.parameters()]))
    assert applied <= 1e-3 * 1.001
    fp32 = Trainer(NoNoise(), Loader(4), TrainConfig(steps=2, batch_size=4, lr=1e-2, grad_clip=1e-3), tmp_path / "ref",
                   progress=False)
    fp32.loader.pos = skipped  # the same batch, on the same (initial) weights
    assert norm == pytest.approx(float(fp32.train_step()["grad_norm"]), rel=1e-2)
