"""Building a model by name: torchvision classifiers, the bundled GPTs, or ``package.module:factory``.

:func:`load_model` returns a :class:`ModelSpec`: the module plus everything needed to run it on
synthetic data. It is deterministic, so every rank of the runtime can rebuild the same model and
draw the same batches:

* weights come from ``torch.manual_seed(seed)`` (inside :func:`torch.random.fork_rng`, so the
  caller's RNG state is untouched);
* ``make_batch(batch_size, seed)`` draws from a private CPU :class:`torch.Generator` seeded with
  ``seed`` and then moves the tensors to the spec's device, so data is identical on any device.

Trust: a ``package.module:factory`` reference runs the user's code. A reference read from a file
(a plan's ``model``) is code from someone else: :func:`check_trusted` refuses it unless it is a
built-in name (:func:`is_builtin`), the user names the same reference on the command line, or
passes ``--trust-model`` (the convention of ``trust_remote_code`` in the Hugging Face libraries).
The current folder is searched for a factory's module only when the caller says the reference is
trusted (``search_cwd``).

Example:
    >>> spec = load_model("gpt2-tiny", batch_size=2)
    >>> (ids,), targets = spec.make_batch(2, seed=0)
    >>> tuple(ids.shape), ids.dtype, tuple(targets.shape)
    ((2, 32), torch.int64, (2, 32))
    >>> loss = spec.loss_fn(spec.module(ids), targets)
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from planner.errors import ModelError
from planner.models.gpt import GPT, GPT_CONFIGS

__all__ = [
    "DTYPES",
    "VISION_INPUT_SHAPE",
    "ModelSpec",
    "check_trusted",
    "is_builtin",
    "load_model",
    "model_names",
    "parse_dtype",
]

VISION_INPUT_SHAPE = (3, 224, 224)
"""Default per-sample input of torchvision classifiers (channels, height, width)."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Parameter and activation dtypes accepted by ``--dtype``."""

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model and how to feed it: what the profiler measures and the runtime rebuilds.

    Attributes:
        name: The name it was loaded by (``resnet50``, ``gpt2-small``, ``pkg.mod:factory``).
        module: The model, in training mode, on its device and dtype, initialised from the seed.
        input_shape: Shape of one sample without the batch dimension (GPT: ``(seq_len,)``).
        input_dtype: dtype of the inputs (the model dtype; ``torch.long`` for token ids).
        make_batch: ``make_batch(batch_size, seed) -> (inputs, targets)``: deterministic
            synthetic data; ``inputs`` is a tuple of positional arguments for ``module``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    make_batch: Callable[[int, int], Batch]
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for ``"float32"`` and friends; an unknown name raises ModelError."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


@cache
def _vision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def model_names() -> tuple[str, ...]:
    """Every built-in model name: the GPT configs and torchvision's classification models."""
    return tuple(GPT_CONFIGS) + _vision_names()


def is_builtin(reference: str) -> bool:
    """Whether ``reference`` names a model shipped with planner or torchvision (no user code).

    Example:
        >>> is_builtin("resnet50"), is_builtin("gpt2-tiny"), is_builtin("mymodels:mlp")
        (True, True, False)
    """
    if reference.startswith("hf:"):  # a transformers config class: no code from the user
        return True
    if ":" in reference:
        return False
    return reference in GPT_CONFIGS or reference in _vision_names()


def check_trusted(reference: str, *, named: str | None = None, trust: bool = False) -> None:
    """Refuse a model reference read from a file unless running it is safe or the user trusts it.

    Built-in names (:func:`is_builtin`) are always fine. Anything else imports and calls code, so
    it is run only when the user names the same reference (``named``, from the command line) or
    says ``trust`` (``--trust-model``).

    Args:
        reference: The model the file names (a plan's ``profile.model``).
        named: The model given on the command line (``--model``), or None.
        trust: Whether the user passed ``--trust-model``.

    Raises:
        ModelError: ``named`` differs from ``reference``, or ``reference`` is code not trusted.

    Example:
        >>> check_trusted("gpt2-tiny")
        >>> check_trusted("evil:f")
        Traceback (most recent call last):
        ...
        planner.errors.ModelError: the plan's model 'evil:f' is code from a file and runs only if you trust it: pass --model 'evil:f' or --trust-model
    """
    if named is not None and named != reference:
        raise ModelError(
            f"--model {named!r} is not the plan's model {reference!r}; "
            "give the plan's own model, or re-plan for the other one"
        )
    if trust or named is not None or is_builtin(reference):
        return
    raise ModelError(
        f"the plan's model {reference!r} is code from a file and runs only if you trust it: "
        f"pass --model {reference!r} or --trust-model"
    )


def load_model(
    spec: str,
    *,
    batch_size: int,
    input_shape: Sequence[int] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    search_cwd: bool = True,
) -> ModelSpec:
    """Build the model named ``spec`` with deterministic weights and check it runs.

    ``spec`` is a torchvision classification model (``resnet50``), a bundled GPT (``gpt2-tiny``,
    ``gpt2-small``, ``gpt2-medium``, ``gpt2-large``) or ``package.module:factory``: the factory is
    called with no arguments and returns a :class:`ModelSpec` (used as is, moved to ``device``
    and ``dtype``) or an ``nn.Module`` (then ``input_shape`` is required; inputs are random
    normal, and the loss is cross-entropy for ``(B, C)`` outputs, else mean-squared error against
    a random target). One forward pass of a single sample (in eval mode, so batch-statistics
    layers accept it) checks the input shape.

    Args:
        spec: Model name or ``package.module:factory``.
        batch_size: Samples per batch (only validated here; batches come from ``make_batch``).
        input_shape: One sample's shape; vision default ``(3, 224, 224)``, GPT ``(seq_len,)``
            where a shorter sequence than the config's keeps the parameter count.
        dtype: Floating dtype of parameters and float inputs (token ids stay ``long``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        seed: Seed of the weights.
        search_cwd: Also look for a factory's module in the current folder (after the import
            path), for a reference the user gave; pass False for one read from a file that the
            user has not trusted (see :func:`check_trusted`).

    Raises:
        ModelError: unknown name (with the closest names), bad factory, dtype or device, or an input
            shape that is non-positive, of the wrong rank, or makes the forward fail.

    Example:
        >>> spec = load_model("resnet18", batch_size=4, input_shape=(3, 64, 64))
        >>> spec.input_shape, sum(p.numel() for p in spec.module.parameters())
        ((3, 64, 64), 11689512)
    """
    if batch_size < 1:
        raise ModelError(f"batch size must be at least 1, got {batch_size}")
    shape = _parse_shape(input_shape)
    torch_dtype = parse_dtype(dtype)
    if not torch_dtype.is_floating_point:
        raise ModelError(f"model dtype must be floating point, got {torch_dtype}")
    dev = _parse_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.startswith("hf:"):
            from planner.models.hf import load_hf

            model = load_hf(
                spec, batch_size=batch_size, input_shape=shape, dtype=torch_dtype, device=dev
            )
        elif ":" in spec:
            model = _from_factory(spec, shape, torch_dtype, dev, search_cwd=search_cwd)
        elif spec in GPT_CONFIGS:
            model = _gpt(spec, shape, torch_dtype, dev)
        elif spec in _vision_names():
            model = _vision(spec, shape, torch_dtype, dev)
        else:
            close = difflib.get_close_matches(spec, model_names(), n=5, cutoff=0.5)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else "see `torchvision.models.list_models()`"
            )
            raise ModelError(
                f"unknown model {spec!r}; {hint} (or give package.module:factory for your own model)"
            )
    return model


# --- builders ------------------------------------------------------------------------------


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r} asked for, but CUDA is not available; use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def _parse_shape(input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ModelError(
            f"input shape {shape} must be one or more positive integers per sample, "
            "without the batch dimension, e.g. 3,224,224"
        )
    return shape


def _vision(
    name: str, shape: tuple[int, ...] | None, dtype: torch.dtype, device: torch.device
) -> ModelSpec:
    import torchvision

    shape = shape or VISION_INPUT_SHAPE
    if len(shape) != 3 or shape[0] != 3:
        raise ModelError(
            f"{name} takes images of shape (3, height, width), got input shape {shape}; "
            "use e.g. --input-shape 3,224,224"
        )
    module = torchvision.models.get_model(name, weights=None)
    num_classes = _num_classes(module)
    return _checked(
        ModelSpec(
            name=name,
            module=module.to(device=device, dtype=dtype).train(),
            input_shape=shape,
            input_dtype=dtype,
            make_batch=partial(
                _normal_batch, shape=shape, dtype=dtype, device=device, num_classes=num_classes
            ),
            loss_fn=_classification_loss,
        )
    )


def _gpt(
    name: str, shape: tuple[int, ...] | None, dtype: torch.dtype, device: torch.device
) -> ModelSpec:
    cfg = GPT_CONFIGS[name]
    if shape is not None:
        if len(shape) != 1:
            raise ModelError(
                f"{name} takes a sequence of token ids, input shape (seq_len,), got {shape}; "
                f"use e.g. --input-shape {cfg.seq_len}"
            )
        cfg = cfg.with_seq_len(shape[0])
    module = GPT(cfg).to(device=device, dtype=dtype).train()
    return _checked(
        ModelSpec(
            name=name,
            module=module,
            input_shape=(cfg.seq_len,),
            input_dtype=torch.long,
            make_batch=partial(
                _token_batch, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, device=device
            ),
            loss_fn=_token_loss,
        )
    )


@contextmanager
def _cwd_on_path(enabled: bool) -> Iterator[None]:
    """While inside, the current folder is the last place imports look (if ``enabled``)."""
    cwd = os.getcwd()
    added = enabled and cwd not in sys.path
    if added:
        sys.path.append(cwd)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _from_factory(
    spec: str,
    shape: tuple[int, ...] | None,
    dtype: torch.dtype,
    device: torch.device,
    *,
    search_cwd: bool,
) -> ModelSpec:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"model {spec!r} must look like package.module:factory")
    with _cwd_on_path(search_cwd):
        try:
            imported = importlib.import_module(module_name)
        except (Exception, SystemExit) as exc:  # ImportError, or whatever the module raises
            raise ModelError(
                f"cannot import {module_name!r} for model {spec!r}: {type(exc).__name__}: {exc}"
            ) from None
        factory = getattr(imported, attr, None)
        if not callable(factory) or (
            isinstance(factory, type) and not issubclass(factory, nn.Module)
        ):
            raise ModelError(
                f"{module_name} has no factory function {attr!r}; model {spec!r} must name a "
                "function returning an nn.Module or a ModelSpec"
            )
        try:
            made = factory()
        except (Exception, SystemExit) as exc:  # SystemExit: a factory like sys:exit
            raise ModelError(
                f"factory {spec!r} failed: {type(exc).__name__}: {exc}; it must return an "
                "nn.Module or a ModelSpec"
            ) from None
    if isinstance(made, ModelSpec):
        if shape is not None and shape != made.input_shape:
            raise ModelError(
                f"factory {spec} fixes input shape {made.input_shape}, but {shape} was asked for; "
                "drop --input-shape or change the factory"
            )
        made.module.to(device=device, dtype=dtype)
        return _checked(made)
    if not isinstance(made, nn.Module):
        raise ModelError(
            f"factory {spec!r} returned {type(made).__name__}; return an nn.Module or a ModelSpec"
        )
    if _is_transformers_model(made):
        from planner.models.hf import spec_from_transformers

        return spec_from_transformers(
            spec, made, output=None, input_shape=shape, dtype=dtype, device=device
        )
    if shape is None:
        raise ModelError(
            f"model {spec} is your own module; give its per-sample input shape, e.g. --input-shape 3,224,224"
        )
    made = made.to(device=device, dtype=dtype).train()
    probe = partial(_normal_batch, shape=shape, dtype=dtype, device=device, num_classes=1)
    out = _first(_check_forward(spec, made, shape, probe))
    # Cross-entropy over classes for (B, C) outputs, else regression to a normal target.
    classes = out.shape[1] if out.dim() == 2 and out.is_floating_point() else None
    return ModelSpec(
        name=spec,
        module=made,
        input_shape=shape,
        input_dtype=dtype,
        make_batch=partial(
            _normal_batch,
            shape=shape,
            dtype=dtype,
            device=device,
            num_classes=classes,
            target_shape=tuple(out.shape[1:]),
        ),
        loss_fn=_classification_loss if classes else _regression_loss,
    )


def _is_transformers_model(module: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (fx cannot trace these; they are exported instead)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _num_classes(module: nn.Module) -> int:
    """Output classes of a torchvision classifier: the last Linear's out_features (1000 by default)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 1000


def _checked(model: ModelSpec) -> ModelSpec:
    """``model`` after checking that one sample runs through it."""
    _check_forward(model.name, model.module, model.input_shape, model.make_batch)
    return model


def _check_forward(
    name: str, module: nn.Module, shape: tuple[int, ...], make_batch: Callable[[int, int], Batch]
) -> Any:
    """Run one sample through ``module``, turning a failure into a ModelError; the output."""
    (inputs, _) = make_batch(1, 0)
    was_training = module.training
    module.eval()  # batch-statistics layers reject a single sample in training mode
    try:
        with torch.no_grad():
            return module(*inputs)
    except Exception as exc:  # any failure of the forward means these inputs do not fit
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{name} fails on input shape {shape}: {reason}; "
            "check --input-shape (per sample, without the batch dimension)"
        ) from None
    finally:
        module.train(was_training)


# --- synthetic data and losses (module level so the runtime can pickle a spec's parts) --------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _normal_batch(
    batch_size: int,
    seed: int,
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    num_classes: int | None,
    target_shape: tuple[int, ...] = (),
) -> Batch:
    """Standard-normal inputs; uniform class targets, or normal ones of ``target_shape``."""
    gen = _generator(seed)
    x = torch.randn((batch_size, *shape), generator=gen).to(device=device, dtype=dtype)
    if num_classes is None:
        targets = torch.randn((batch_size, *target_shape), generator=gen).to(device)
    else:
        targets = torch.randint(num_classes, (batch_size,), generator=gen).to(device)
    return (x,), targets


def _token_batch(
    batch_size: int, seed: int, *, seq_len: int, vocab_size: int, device: torch.device
) -> Batch:
    """Uniform random token ids; targets are the same sequence shifted left by one token."""
    gen = _generator(seed)
    ids = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=gen)
    return (ids[:, :-1].contiguous().to(device),), ids[:, 1:].contiguous().to(device)


def _first(outputs: Any) -> torch.Tensor:
    """The main output: Inception and GoogLeNet return (logits, aux...) in training mode."""
    while isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return outputs


def _classification_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_first(outputs).float(), targets)


def _token_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    logits = _first(outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _regression_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(_first(outputs).float(), targets.float())
