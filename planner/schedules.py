"""Pipeline schedules: the choices, shared by the optimizer, the simulator and the runtime."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["OptimizerKind", "Schedule"]


class Schedule(StrEnum):
    """How microbatches flow through the stages.

    PIPEDREAM: asynchronous 1F1B with weight stashing, no flush (PipeDream, SOSP'19).
    ONE_F_ONE_B: 1F1B with a flush per minibatch (PipeDream-Flush / DAPPLE), synchronous.
    GPIPE: all forwards, then all backwards, then the flush (GPipe).
    """

    PIPEDREAM = "pipedream"
    ONE_F_ONE_B = "1f1b"
    GPIPE = "gpipe"


class OptimizerKind(StrEnum):
    """The training optimizer, which sets the state kept per parameter (memory)."""

    SGD = "sgd"  # no state
    MOMENTUM = "momentum"  # one buffer per parameter
    ADAM = "adam"  # two buffers per parameter
