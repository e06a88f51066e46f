"""The run's configuration: one frozen dataclass behind ``plan run`` and ``python -m planner.runtime``.

Example:
    >>> cfg = RunConfig(plan_path="plan.json", steps=3, lr=0.1)
    >>> RunConfig.from_argv(cfg.to_argv()) == cfg
    True
    >>> cfg.report_file
    PosixPath('plan.report.json')
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from planner.errors import PlannerError

__all__ = ["Backend", "Engine", "RunConfig", "RunError", "add_run_arguments", "resolve_backend"]

_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


class RunError(PlannerError):
    """The run cannot start as asked (bad option values, too few processes)."""


class Backend(StrEnum):
    """The torch.distributed backend: ``auto`` picks nccl where CUDA exists, else gloo."""

    AUTO = "auto"
    GLOO = "gloo"
    NCCL = "nccl"


class Engine(StrEnum):
    """Which pipeline engine trains: ours, or torch.distributed.pipelining's (same stages)."""

    OURS = "ours"
    TORCH = "torch"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How to train a plan.

    Attributes:
        plan_path: The plan file.
        steps: Optimizer steps (minibatches) to run.
        lr: Learning rate.
        momentum: SGD momentum; None: the optimizer kind's (0.9 for ``momentum``, else 0).
        optimizer: Train with this optimizer instead of the plan's (``sgd``, ``momentum``,
            ``adam``, ``adamw``); None: the plan's.
        weight_decay: Weight decay; None: the plan's (0 when it says nothing).
        clip_grad: Clip the whole model's gradient norm to this; None: the plan's (no clipping
            when it says nothing).
        data: ``synthetic`` (the model's ``make_batch``) or a torchvision image-folder path.
        timeout_s: torch.distributed timeout; a lost peer fails the run after at most this long.
        threads: CPU threads per process (torch.set_num_threads); 0: the cores one rank gets
            when the local ranks share the machine (``cores // local ranks``, at least 1), as
            the profiler assumes (:mod:`planner.profile.conditions`).
        seed: Seed of the model's initial weights and of the data.
        backend: torch.distributed backend.
        report_path: Where to write the JSON report; None means beside the plan
            (``<plan>.report.json``).
        log_every: Print loss and samples/s every this many steps (0: never).
        update_interval: ``pipedream`` only: optimizer steps every this many update points
            (after every backward, or every round of ``R`` microbatches on replicated stages).
        checkpoint_dir: Folder of checkpoints (None: no checkpoints).
        checkpoint_every: Save a checkpoint every this many steps (0: never).
        resume: Start from the newest complete checkpoint in ``checkpoint_dir``.
        model: The model the user names on the command line (``--model``); the plan's model
            must be this one, and then its code is trusted (see
            :func:`planner.models.registry.check_trusted`).
        trust_model: Run the plan's model even if it is code from a file (``--trust-model``).
        engine: ``ours`` (the bundled runtime) or ``torch`` (torch.distributed.pipelining's
            ``PipelineStage`` and schedules on the same stage cut; see
            :mod:`planner.runtime.torch_engine`).
    """

    plan_path: str
    steps: int = 10
    lr: float = 0.01
    momentum: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    clip_grad: float | None = None
    data: str = "synthetic"
    timeout_s: float = 60.0
    threads: int = 0
    seed: int = 0
    backend: Backend = Backend.AUTO
    report_path: str | None = None
    log_every: int = 1
    update_interval: int = 1
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    model: str | None = None
    trust_model: bool = False
    engine: Engine = Engine.OURS

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise RunError(f"--steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise RunError(f"--lr must be positive, got {self.lr}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise RunError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer is not None and self.optimizer not in _OPTIMIZERS:
            raise RunError(
                f"--optimizer {self.optimizer!r} is not one of {', '.join(_OPTIMIZERS)}; pick one"
            )
        if self.weight_decay is not None and not (
            math.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            raise RunError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.clip_grad is not None and not (
            math.isfinite(self.clip_grad) and self.clip_grad > 0
        ):
            raise RunError(f"--clip-grad must be a positive norm, got {self.clip_grad}")
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise RunError(f"--timeout must be positive seconds, got {self.timeout_s}")
        if self.threads < 0:
            raise RunError(f"--threads must be at least 1 (0: automatic), got {self.threads}")
        if self.update_interval < 1:
            raise RunError(f"--update-interval must be at least 1, got {self.update_interval}")
        if self.checkpoint_every < 0:
            raise RunError(f"--checkpoint-every must be 0 or more, got {self.checkpoint_every}")
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
            raise RunError("--checkpoint-every and --resume need --checkpoint-dir DIR")
        if self.log_every < 0:
            raise RunError(f"--log-every must be 0 or more, got {self.log_every}")

    @property
    def report_file(self) -> Path:
        if self.report_path is not None:
            return Path(self.report_path)
        plan = Path(self.plan_path)
        return plan.with_name(f"{plan.stem}.report.json")

    def with_threads(self, local_ranks: int) -> RunConfig:
        """This config with ``threads`` fixed: given, or the cores one of ``local_ranks`` gets."""
        if self.threads:
            return self
        from planner.profile.conditions import rank_threads

        return dataclasses.replace(self, threads=rank_threads(ranks_on_host=local_ranks))

    def to_argv(self) -> list[str]:
        """Command-line arguments that :meth:`from_argv` reads back into this config."""
        argv = [
            self.plan_path,
            "--steps",
            str(self.steps),
            "--lr",
            repr(self.lr),
            "--data",
            self.data,
            "--timeout",
            repr(self.timeout_s),
            "--seed",
            str(self.seed),
            "--backend",
            str(self.backend),
            "--log-every",
            str(self.log_every),
            "--update-interval",
            str(self.update_interval),
        ]
        for flag, value in (
            ("--momentum", self.momentum),
            ("--optimizer", self.optimizer),
            ("--weight-decay", self.weight_decay),
            ("--clip-grad", self.clip_grad),
            ("--threads", self.threads or None),
        ):
            if value is not None:
                argv += [flag, value if isinstance(value, str) else repr(value)]
        if self.report_path is not None:
            argv += ["--report", self.report_path]
        if self.checkpoint_dir is not None:
            argv += [
                "--checkpoint-dir",
                self.checkpoint_dir,
                "--checkpoint-every",
                str(self.checkpoint_every),
            ]
        if self.resume:
            argv.append("--resume")
        if self.model is not None:
            argv += ["--model", self.model]
        if self.trust_model:
            argv.append("--trust-model")
        if self.engine is not Engine.OURS:
            argv += ["--engine", str(self.engine)]
        return argv

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        return cls(
            plan_path=args.plan,
            steps=args.steps,
            lr=args.lr,
            momentum=args.momentum,
            optimizer=args.optimizer,
            weight_decay=args.weight_decay,
            clip_grad=args.clip_grad,
            data=args.data,
            timeout_s=args.timeout,
            threads=args.threads or 0,
            seed=args.seed,
            backend=Backend(args.backend),
            report_path=args.report,
            log_every=args.log_every,
            update_interval=args.update_interval,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            model=args.model,
            trust_model=args.trust_model,
            engine=Engine(getattr(args, "engine", Engine.OURS)),
        )

    @classmethod
    def from_argv(cls, argv: list[str]) -> RunConfig:
        parser = argparse.ArgumentParser(prog="planner.runtime")
        add_run_arguments(parser)
        return cls.from_args(parser.parse_args(argv))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``plan run`` and ``python -m planner.runtime``."""
    d = RunConfig(plan_path="")
    parser.add_argument("plan", help="the plan JSON file to run")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (minibatches)")
    parser.add_argument(
        "--lr", type=float, default=d.lr, help="learning rate (default %(default)s)"
    )
    parser.add_argument(
        "--optimizer",
        choices=_OPTIMIZERS,
        default=None,
        help="train with this optimizer instead of the plan's (the run says how that changes "
        "memory)",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=None,
        help="SGD momentum (default: 0.9 for a 'momentum' plan, else 0)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay (default: the plan's, else 0; decoupled for adamw)",
    )
    parser.add_argument(
        "--clip-grad",
        type=float,
        default=None,
        metavar="NORM",
        help="clip the whole model's gradient norm (default: the plan's, else no clipping)",
    )
    parser.add_argument(
        "--data", default=d.data, help="'synthetic' (default) or a torchvision image-folder path"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=d.timeout_s,
        metavar="S",
        help="seconds before a silent peer fails the run (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads per process (default: cores // local ranks, at least 1: what the "
        "profiler assumes)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of weights and data")
    parser.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=str(d.backend),
        help="torch.distributed backend (auto: nccl with CUDA, else gloo)",
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="PATH",
        help="JSON report path (default: <plan>.report.json beside the plan)",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=d.log_every,
        metavar="N",
        help="print loss and samples/s every N steps (0: never)",
    )
    parser.add_argument(
        "--update-interval",
        type=int,
        default=d.update_interval,
        metavar="N",
        help="pipedream: step the optimizer every N update points (default 1)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="DIR",
        help="save checkpoints here (one file per rank per checkpoint)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        metavar="N",
        help="checkpoint every N steps (0: never; pipedream drains there)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --checkpoint-dir",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="REF",
        help="the plan's model, package.module:factory: naming it here trusts its code "
        "(a plan's own model that is not built in runs only so, or with --trust-model)",
    )
    parser.add_argument(
        "--trust-model",
        action="store_true",
        help="run the plan's model even if it is code from a file (like trust_remote_code)",
    )
    parser.add_argument(
        "--engine",
        choices=[e.value for e in Engine],
        default=str(Engine.OURS),
        help="ours (default), or torch: torch.distributed.pipelining's PipelineStage and "
        "ScheduleGPipe/Schedule1F1B on the same stages",
    )


def resolve_backend(choice: Backend, *, local_ranks: int) -> str:
    """The backend to use for ``local_ranks`` processes on this machine; checked before starting.

    ``auto`` is nccl when CUDA has a GPU for every local rank, else gloo.

    Raises:
        RunError: nccl without CUDA, or with fewer GPUs than local ranks.
    """
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice is Backend.AUTO:
        return "nccl" if gpus >= local_ranks > 0 else "gloo"
    if choice is Backend.NCCL and gpus == 0:
        raise RunError("--backend nccl needs CUDA, which this machine lacks; use --backend gloo")
    if choice is Backend.NCCL and gpus < local_ranks:
        raise RunError(
            f"--backend nccl needs one GPU per local rank: {local_ranks} ranks but {gpus} GPUs "
            "here; use --backend gloo or re-plan for fewer devices"
        )
    return str(choice)
