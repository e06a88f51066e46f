"""Training data for the runtime: the same minibatch on every rank, cut into microbatches.

Every rank that needs data (stage 0 for the inputs, the last stage for the targets) builds the
step's whole minibatch from the same seed and takes its microbatches: microbatch ``m`` is rows
``m * b`` to ``(m + 1) * b`` of the minibatch (``b`` the microbatch size), on every tensor.
Replicas therefore see consistent data and the result equals single-process training on the
minibatch. Synthetic data comes from the model's ``make_batch``; ``--data PATH`` reads a
torchvision image folder in a seeded order.

Example:
    >>> import torch
    >>> batch = ((torch.arange(8).reshape(4, 2),), torch.arange(4))
    >>> inputs, targets = microbatch(batch, 1, size=2)
    >>> inputs[0].tolist(), targets.tolist()
    ([[4, 5], [6, 7]], [2, 3])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from planner.errors import ModelError

__all__ = ["Batch", "DataSource", "ModelLike", "data_source", "microbatch", "minibatch_seed"]

Batch = tuple[tuple[Any, ...], Any]


class ModelLike(Protocol):
    """What the runtime needs of a model (``planner.models.ModelSpec`` is one)."""

    @property
    def module(self) -> torch.nn.Module: ...

    @property
    def make_batch(self) -> Callable[[int, int], Batch]: ...

    @property
    def loss_fn(self) -> Callable[[Any, Any], torch.Tensor]: ...


DataSource = Callable[[int], Batch]


def minibatch_seed(seed: int, step: int) -> int:
    """The data seed of step ``step`` (0-based) of a run seeded ``seed``."""
    return seed * 1_000_003 + step + 1


def microbatch(batch: Batch, index: int, *, size: int) -> Batch:
    """Microbatch ``index`` of ``batch``: rows ``index * size`` to ``(index + 1) * size``."""
    rows = slice(index * size, (index + 1) * size)
    inputs, targets = batch
    cut = [x[rows] if isinstance(x, torch.Tensor) else x for x in inputs]
    return tuple(cut), pytree.tree_map(
        lambda x: x[rows] if isinstance(x, torch.Tensor) else x, targets
    )


def data_source(
    spec: ModelLike, *, data: str, minibatch_size: int, seed: int, input_shape: tuple[int, ...] = ()
) -> DataSource:
    """A function from step to that step's minibatch.

    Args:
        spec: The model (its ``make_batch`` for synthetic data).
        data: ``"synthetic"`` or the path of a torchvision image folder.
        minibatch_size: Samples per minibatch.
        seed: The run's seed.
        input_shape: Shape of one sample (to resize images to).

    Raises:
        ModelError: The folder does not exist or the model does not take images.
    """
    if data == "synthetic":
        return lambda step: spec.make_batch(minibatch_size, minibatch_seed(seed, step))
    return _image_folder(
        Path(data), minibatch_size=minibatch_size, seed=seed, input_shape=input_shape
    )


def _image_folder(
    root: Path, *, minibatch_size: int, seed: int, input_shape: tuple[int, ...]
) -> DataSource:
    if not root.is_dir():
        raise ModelError(f"--data {root} is not a folder; pass 'synthetic' or an image folder")
    if len(input_shape) != 3:
        raise ModelError(
            f"--data {root} holds images but the model takes samples of shape {input_shape}; "
            "use --data synthetic"
        )
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize(tuple(input_shape[1:])),
            transforms.ToTensor(),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    if len(dataset) < minibatch_size:
        raise ModelError(
            f"--data {root} has {len(dataset)} images, fewer than one minibatch of {minibatch_size}"
        )
    per_epoch = len(dataset) // minibatch_size

    def load(step: int) -> Batch:
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        picks = order[index * minibatch_size : (index + 1) * minibatch_size].tolist()
        samples = [dataset[i] for i in picks]
        images = torch.stack([image for image, _ in samples])
        if images.shape[1] != input_shape[0]:  # grey images for a 3-channel model, or back
            images = images.mean(1, keepdim=True).expand(-1, input_shape[0], -1, -1).contiguous()
        return (images,), torch.tensor([label for _, label in samples])

    return load
