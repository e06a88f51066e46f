"""``plan profile``: measure a model's per-layer costs and write a profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from planner._io import check_outputs
from planner.commands._args import nonnegative_int, positive_int, shape
from planner.errors import ModelError

__all__ = ["add_arguments", "resolve_device", "run"]


def _nvidia_device_present() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def resolve_device(choice: str | None) -> str:
    """``--device`` as given; by default the local GPU where CUDA works, else ``cpu``.

    torch is imported only on machines with an NVIDIA device (seconds of start-up elsewhere).
    """
    if choice is not None:
        return choice
    if not _nvidia_device_present():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_profiling_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options that say how to measure (shared with ``plan`` when it must profile)."""
    parser.add_argument(
        "--model-config",
        metavar="JSON",
        help="fields of a Hugging Face model's config, e.g. '{\"n_layer\": 12}' (hf: models only)",
    )
    parser.add_argument(
        "--input-shape",
        type=shape,
        metavar="C,H,W",
        help="one sample's shape without the batch dimension "
        "(default: the model's, e.g. 3,224,224)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "v100"),
        default=None,
        help="where to measure (default: the local GPU where CUDA works, else cpu; with a GPU, "
        "plan --model M profiles it instead of using the shipped CPU profile); plan --device v100 plans with PipeDream's V100 "
        "profile (resnet50, vgg16, resnet18, alexnet) instead of measuring",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="parameter and activation dtype (default: float32)",
    )
    parser.add_argument(
        "--leaf-modules",
        nargs="+",
        default=[],
        metavar="NAME",
        help="module types (Block) or qualified names (blocks.3) to keep whole "
        "as one layer; also the fix for models torch.fx cannot trace",
    )
    parser.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=None,
        help="untimed whole-model forward+backward steps before timing (default: 1)",
    )
    parser.add_argument(
        "--reps",
        type=positive_int,
        default=None,
        help="most timed repetitions per layer; a layer stops at two agreeing samples, "
        "the median is kept (default: 3)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads while measuring (default: the cores one rank gets when the "
        "ranks share this machine: cores // 2 for plan profile, cores // devices for plan; "
        "plan run uses the same rule); recorded",
    )
    parser.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="auto (default): process CPU time with one CPU thread (leaves out the time other "
        "jobs hold the core), else wall clock; recorded as timer",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="torchvision model name (resnet50), gpt2-small/gpt2-medium/gpt2-tiny, "
        "hf:<model_type> (hf:gpt2, hf:llama, hf:bert), "
        "or package.module:factory for your own model",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, required=True, help="samples per measured batch"
    )
    add_profiling_arguments(parser)
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="where to write the profile JSON"
    )


def measure(  # type: ignore[no-untyped-def]
    args: argparse.Namespace,
    batch_size: int,
    *,
    ranks_on_host: int | None = None,
    fit_batch: bool = False,
    batch_option: str = "--batch-size",
):
    """Profile ``args.model`` as the options say; returns the Profile.

    Threads default to what one of ``ranks_on_host`` ranks sharing this machine gets
    (:func:`planner.profile.conditions.rank_threads`; default: a 2-rank local run's); leaf
    modules to :func:`planner.profile.measure.default_leaf_modules`. A batch that does not fit
    in half of the free memory is refused (naming ``batch_option``), or reduced with
    ``fit_batch``.
    """
    from planner.profile.conditions import DEFAULT_PROFILE_RANKS, default_clock, rank_threads
    from planner.profile.measure import default_leaf_modules, profile_model

    args.device = resolve_device(args.device)
    if args.device == "v100":
        raise ModelError(
            f"--device v100 stands for PipeDream's V100 profile, which only plan uses "
            f"(plan --model {args.model} --device v100); to measure here use --device cpu or cuda"
        )
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ModelError("--device cuda but CUDA is not available here; use --device cpu")
    import time

    kwargs = {k: getattr(args, k) for k in ("warmup", "reps") if getattr(args, k) is not None}
    threads = args.threads or rank_threads(ranks_on_host=ranks_on_host or DEFAULT_PROFILE_RANKS)
    kwargs["threads"] = threads
    clock = default_clock(args.device, threads) if args.clock == "auto" else args.clock
    if clock == "cpu":
        if args.device == "cuda":
            raise ModelError(
                "--clock cpu does not time GPU work; use --clock wall with --device cuda"
            )
        kwargs["clock"] = time.process_time
    from planner.models.hf import with_model_config

    return profile_model(
        with_model_config(args.model, args.model_config),
        batch_size=batch_size,
        input_shape=args.input_shape,
        device=args.device,
        dtype=args.dtype,
        leaf_modules=tuple(args.leaf_modules) or default_leaf_modules(args.model),
        progress=True,
        fit_batch=fit_batch,
        batch_option=batch_option,
        **kwargs,
    )


def run(args: argparse.Namespace) -> int:
    outputs = check_outputs([("-o", args.output)], inputs=(), error=ModelError)
    profile = measure(args, args.batch_size)
    profile.save(args.output)
    whole = profile.whole_step_ms
    ratio = (
        f", per-layer sum / whole step = {profile.total_compute_ms / whole:.3f}" if whole else ""
    )
    if profile.calibration:
        ratio += f" ({profile.calibration})"
    print(
        f"profiled {profile.model} at batch {profile.batch_size} on {profile.device} "
        f"({profile.threads or '?'} threads): {len(profile.layers)} layers, "
        f"{profile.total_compute_ms:.1f} ms forward+backward{ratio}",
        file=sys.stderr,
    )
    print(outputs.announce(args.output))
    return 0
