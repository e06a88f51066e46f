"""Models for the CLI tests, importable as `cli_models:NAME` with tests/ on PYTHONPATH."""

import torch


class _DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return y
        return -y


def untraceable() -> torch.nn.Module:
    return _DataDependent()
