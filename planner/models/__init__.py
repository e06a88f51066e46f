"""Models the planner can build by name: torchvision classifiers and a GPT-style decoder.

Example:
    >>> from planner.models import load_model
    >>> spec = load_model("gpt2-tiny", batch_size=2)
    >>> spec.name, spec.input_shape
    ('gpt2-tiny', (32,))
"""

from planner.models.gpt import GPT, GPT_CONFIGS, Block, GPTConfig
from planner.models.registry import DTYPES, ModelSpec, load_model, model_names, parse_dtype

__all__ = [
    "DTYPES",
    "GPT",
    "GPT_CONFIGS",
    "Block",
    "GPTConfig",
    "ModelSpec",
    "load_model",
    "model_names",
    "parse_dtype",
]
