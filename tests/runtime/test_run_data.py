"""Training data: seeded synthetic minibatches and a torchvision image folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner.errors import ModelError
from planner.models import load_model
from planner.runtime.data import data_source, minibatch_seed


def test_synthetic_minibatches_are_the_same_on_every_rank() -> None:
    spec = load_model("runtime_models:mlp", batch_size=4)
    a = data_source(spec, data="synthetic", minibatch_size=8, seed=1)
    b = data_source(spec, data="synthetic", minibatch_size=8, seed=1)
    torch.testing.assert_close(a(3)[0][0], b(3)[0][0])
    assert not torch.equal(a(3)[0][0], a(4)[0][0])
    assert minibatch_seed(1, 3) != minibatch_seed(0, 3)


def test_image_folder_gives_resized_images_and_labels(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            image.new("RGB", (12, 10), color=(40 * i, 80, 120)).save(tmp_path / label / f"{i}.png")
    spec = load_model("runtime_models:cnn", batch_size=2)
    source = data_source(spec, data=str(tmp_path), minibatch_size=4, seed=0, input_shape=(3, 8, 8))
    (images,), labels = source(0)
    assert images.shape == (4, 3, 8, 8) and labels.shape == (4,)
    assert set(labels.tolist()) <= {0, 1}
    torch.testing.assert_close(source(0)[0][0], images)  # same step, same images


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    spec = load_model("runtime_models:mlp", batch_size=2)
    with pytest.raises(ModelError, match="not a folder"):
        data_source(
            spec, data=str(tmp_path / "nope"), minibatch_size=2, seed=0, input_shape=(3, 8, 8)
        )
