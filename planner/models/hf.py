"""Hugging Face transformers models by ``model_type``, built from their config with no download.

``hf:gpt2``, ``hf:llama``, ``hf:bert`` (any ``model_type`` transformers knows) builds the model
class for that type from ``AutoConfig.for_model(model_type, **overrides)`` with seeded random
weights: a masked-LM head for encoders (BERT, RoBERTa), else a causal-LM head (GPT-2, Llama),
else the bare model. No weights or tokenizer are downloaded.

The model is captured with ``torch.export`` (``use_cache=False``; fx cannot trace transformers)
and regrouped into one layer per transformer block and per module outside the blocks
(:mod:`planner.profile.export_capture`), so profile, plan, ``plan run`` and export work as for
any other model.

**Small by default.** Unless the configuration says otherwise, the planner shrinks the
architecture to ``DEFAULT_OVERRIDES`` (4 blocks, width 256, 4 heads, vocabulary 4096, 512
positions, sequences of 128 tokens), turns dropout off (so a pipeline computes exactly what one
device computes) and unties the LM head from the embedding (so every parameter lives in one
stage). Real sizes are one JSON object away: ``--model-config '{"n_layer": 12, "n_embd": 768,
"n_head": 12, "vocab_size": 50257}'``. The full reference carries its overrides, as in
``hf:gpt2{"n_layer":12}``, so a profile or a plan records exactly which model it is for.

Example:
    >>> spec = load_hf('hf:gpt2{"n_layer":2,"n_embd":64,"n_head":2}', batch_size=2,
    ...                input_shape=(16,))                                      # doctest: +SKIP
    >>> [name for name, _ in spec.module.named_children()]                     # doctest: +SKIP
    ['transformer_wte', 'transformer_wpe', 'transformer_drop', 'transformer_h_0', ...]
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from planner.errors import ModelError
from planner.models.registry import ModelSpec, _regression_loss, _token_batch, _token_loss
from planner.profile.export_capture import export_layers

__all__ = [
    "DEFAULT_OVERRIDES",
    "DEFAULT_SEQ_LEN",
    "PREFIX",
    "is_hf_reference",
    "load_hf",
    "parse_reference",
    "spec_from_transformers",
    "with_model_config",
]

PREFIX = "hf:"
DEFAULT_SEQ_LEN = 128
"""Tokens per sample when no ``--input-shape`` is given."""

DEFAULT_OVERRIDES: dict[str, Any] = {
    # Each applies to whichever of its spellings the config class has.
    "n_layer|num_hidden_layers": 4,
    "n_embd|hidden_size|d_model|dim": 256,
    "n_head|num_attention_heads|n_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size|hidden_dim": 1024,
    "vocab_size": 4096,
    "n_positions|max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
"""What the planner changes in a config class's defaults, unless the user's overrides say."""


def is_hf_reference(reference: str) -> bool:
    """Whether ``reference`` names a transformers model (``hf:<model_type>``)."""
    return reference.startswith(PREFIX)


def parse_reference(reference: str) -> tuple[str, dict[str, Any]]:
    """``'hf:gpt2{"n_layer":2}'`` -> ``("gpt2", {"n_layer": 2})``.

    Raises:
        ModelError: Not ``hf:<model_type>``, or the JSON after it is not an object.
    """
    if not is_hf_reference(reference):
        raise ModelError(f"{reference!r} is not a Hugging Face model; use hf:<model_type>")
    body = reference[len(PREFIX) :]
    model_type, brace, rest = body.partition("{")
    if not model_type:
        raise ModelError(f"model {reference!r} names no model_type; use e.g. hf:gpt2 or hf:llama")
    overrides = _parse_object(brace + rest, f"the configuration in {reference!r}") if brace else {}
    return model_type, overrides


def with_model_config(reference: str, model_config: str | None) -> str:
    """The reference with ``--model-config`` JSON merged in (later keys win); canonical form.

    Raises:
        ModelError: The reference is not ``hf:``, or the JSON is not an object.
    """
    if model_config is None:
        return reference
    if not is_hf_reference(reference):
        raise ModelError(
            f"--model-config applies to Hugging Face models (hf:<model_type>), not {reference!r}; "
            "drop it or use e.g. --model hf:gpt2"
        )
    model_type, overrides = parse_reference(reference)
    overrides.update(_parse_object(model_config, "--model-config"))
    return _canonical(model_type, overrides)


def _canonical(model_type: str, overrides: Mapping[str, Any]) -> str:
    if not overrides:
        return PREFIX + model_type
    return PREFIX + model_type + json.dumps(dict(overrides), sort_keys=True, separators=(",", ":"))


def _parse_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{what} is not valid JSON ({exc.msg} at character {exc.pos}); "
            "give an object such as '{\"n_layer\": 4}'"
        ) from None
    if not isinstance(value, dict):
        raise ModelError(f'{what} must be a JSON object such as {{"n_layer": 4}}, got {text!r}')
    return value


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "Hugging Face models need the transformers package; "
            'install it with pip install "planner[hf]" (or pip install transformers)'
        ) from None
    return transformers


def _config(model_type: str, overrides: Mapping[str, Any]) -> Any:
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=4)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. gpt2, llama, bert"
        raise ModelError(f"transformers has no model_type {model_type!r}; {hint}")
    base = CONFIG_MAPPING[model_type]()
    unknown = [key for key in overrides if not hasattr(base, key)]
    if unknown:
        fields = sorted(k for k in base.to_dict() if not k.startswith("_"))
        close = difflib.get_close_matches(unknown[0], fields, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"fields: {', '.join(fields[:12])}"
        raise ModelError(
            f"--model-config: {model_type} configs have no field {unknown[0]!r}; {hint}"
        )
    for key, value in overrides.items():
        _check_type(model_type, key, getattr(base, key), value)
    settings: dict[str, Any] = {}
    for spellings, value in DEFAULT_OVERRIDES.items():
        keys = spellings.split("|")
        if any(key in overrides for key in keys):
            continue
        # The first spelling the class has (aliases such as num_hidden_layers -> n_layer are
        # the same field: setting both would let the default win over an override).
        present = [k for k in keys if getattr(base, k, None) is not None]
        if present:
            settings[present[0]] = value
    for key in base.to_dict():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(getattr(base, key), float):
            settings[key] = 0.0
    settings.update(overrides)
    vocab = settings.get("vocab_size", getattr(base, "vocab_size", None))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(base, key, None)
        if key in overrides or not isinstance(vocab, int) or not isinstance(token, int):
            continue
        if token >= vocab:  # GPT-2's 50256 in a shrunk vocabulary: keep ids in range
            settings[key] = vocab - 1
    try:
        return transformers.AutoConfig.for_model(model_type, **settings)
    except Exception as exc:  # transformers validates in __init__: ValueError, TypeError...
        raise ModelError(
            f"transformers rejects the {model_type} configuration: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; fix --model-config"
        ) from None


def _check_type(model_type: str, key: str, default: Any, value: Any) -> None:
    """A value of the default's type (an int where a float is expected is fine)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ModelError(
            f"--model-config: {model_type} field {key} takes a {type(default).__name__} "
            f"like its default {default!r}, got {value!r}"
        )


def _build(config: Any) -> tuple[nn.Module, str | None]:
    """The model for ``config``, with the output attribute that holds its result."""
    transformers = _transformers()
    from transformers.models.auto import modeling_auto as auto

    kind = config.model_type
    for names, cls, output in (
        (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, transformers.AutoModelForMaskedLM, "logits"),
        (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, transformers.AutoModelForCausalLM, "logits"),
        (auto.MODEL_MAPPING_NAMES, transformers.AutoModel, "last_hidden_state"),
    ):
        if kind in names:
            try:
                return cls.from_config(config), output
            except Exception as exc:
                raise ModelError(
                    f"transformers cannot build {kind} from its config: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                ) from None
    raise ModelError(f"transformers has no model class for {kind!r}; use a text model type")


def load_hf(
    reference: str,
    *,
    batch_size: int,
    input_shape: tuple[int, ...] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> ModelSpec:
    """Build and capture ``hf:<model_type>[{overrides}]`` (see the module docstring).

    The caller seeds torch's RNG (weights are drawn from it).

    Raises:
        ModelError: transformers is missing, the type or a field is unknown, a value is invalid,
            or the model cannot be captured.
    """
    model_type, overrides = parse_reference(reference)
    config = _config(model_type, overrides)
    model, output = _build(config)
    return spec_from_transformers(
        _canonical(model_type, overrides),
        model,
        output=output,
        input_shape=input_shape,
        dtype=dtype,
        device=device,
    )


def spec_from_transformers(
    name: str,
    model: nn.Module,
    *,
    output: str | None,
    input_shape: tuple[int, ...] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> ModelSpec:
    """A :class:`ModelSpec` for a transformers model taking token ids: exported and regrouped.

    Logits ``(B, T, V)`` are trained with next-token cross-entropy on random ids; any other
    output with mean-squared error against a random target.
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise ModelError(f"{name}: the model's config has no vocab_size; it must take token ids")
    seq_len = _seq_len(name, config, input_shape)
    model = model.to(device=device, dtype=dtype).train()
    ids = torch.randint(vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
    kwargs: dict[str, Any] = {}
    if "use_cache" in getattr(config, "to_dict", dict)():
        kwargs["use_cache"] = False
    module = export_layers(model, (ids.to(device),), kwargs=kwargs, output=output)
    with torch.no_grad():
        out = module(ids[:1].to(device))
    if out.dim() == 3 and out.shape[-1] == vocab:
        make_batch = partial(_token_batch, seq_len=seq_len, vocab_size=vocab, device=device)
        loss_fn: Any = _token_loss
    else:
        make_batch = partial(
            _hf_regression_batch,
            seq_len=seq_len,
            vocab_size=vocab,
            device=device,
            target_shape=tuple(out.shape[1:]),
        )
        loss_fn = _regression_loss
    return ModelSpec(
        name=name,
        module=module,
        input_shape=(seq_len,),
        input_dtype=torch.long,
        make_batch=make_batch,
        loss_fn=loss_fn,
    )


def _seq_len(name: str, config: Any, input_shape: tuple[int, ...] | None) -> int:
    limit = next(
        (
            getattr(config, key)
            for key in ("n_positions", "max_position_embeddings", "n_ctx")
            if isinstance(getattr(config, key, None), int)
        ),
        None,
    )
    if input_shape is None:
        return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if len(input_shape) != 1:
        raise ModelError(
            f"{name} takes a sequence of token ids, input shape (seq_len,), got {input_shape}; "
            f"use e.g. --input-shape {DEFAULT_SEQ_LEN}"
        )
    if input_shape[0] < 2:
        raise ModelError(f"{name}: sequences of at least 2 tokens, got {input_shape[0]}")
    if limit and input_shape[0] > limit:
        raise ModelError(
            f"{name} has {limit} positions but --input-shape asks for {input_shape[0]} tokens; "
            f"use at most {limit} or raise the positions with --model-config"
        )
    return input_shape[0]


def _hf_regression_batch(
    batch_size: int,
    seed: int,
    *,
    seq_len: int,
    vocab_size: int,
    device: torch.device,
    target_shape: tuple[int, ...],
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Random token ids and a standard-normal target of the output's shape."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(vocab_size, (batch_size, seq_len), generator=gen)
    targets = torch.randn((batch_size, *target_shape), generator=gen)
    return (ids.to(device),), targets.to(device)
