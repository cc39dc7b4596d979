"""The batched fractal source (the GPU path of data.source=fractal) gives the loader path's batches."""

from __future__ import annotations

import torch

from mae_et.data.folder import StepSampler, step_loader
from mae_et.data.fractal import FractalBatchSource, FractalDataset


def test_batched_source_matches_the_loader_path_and_resumes():
    dataset = FractalDataset(num_classes=4, samples_per_class=6, size=32, seed=3)
    loader = step_loader(dataset, StepSampler(len(dataset), 4, 1, 2, seed=7, num_micro_steps=5), num_workers=0)
    batched = FractalBatchSource(dataset, StepSampler(len(dataset), 4, 1, 2, seed=7, num_micro_steps=5), "cpu")
    pairs = list(zip(loader, batched))
    assert len(pairs) == 5
    for a, b in pairs:
        assert torch.equal(a.labels, b.labels)
        assert b.images.dtype == torch.uint8 and b.images.shape == (4, 3, 32, 32)
        assert torch.equal(a.images, b.images)  # on CPU the batched renderer equals the per-sample one
    resumed = FractalBatchSource(
        dataset, StepSampler(len(dataset), 4, 1, 2, 7, start_micro_step=3, num_micro_steps=2), "cpu"
    )
    for (_, b), c in zip(pairs[3:], resumed):
        assert torch.equal(b.images, c.images)
