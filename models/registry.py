"""Name -> model builder registry: ``create_model("se_resnext50_32x4d")``."""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_OPTIONS: dict[str, frozenset[str]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant under its function name.

    The builder's return annotation names the model class; that class's constructor arguments
    are the overrides ``create_model`` accepts for this name, so a typo fails before building.
    """
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is registered twice")
    model_cls = typing.get_type_hints(builder)["return"]
    _OPTIONS[name] = frozenset(inspect.signature(model_cls.__init__).parameters) - {"self"}
    _BUILDERS[name] = builder
    return builder


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BUILDERS)


def model_options(name: str) -> list[str]:
    """The keyword overrides ``create_model(name, ...)`` accepts, sorted."""
    _check_name(name)
    return sorted(_OPTIONS[name])


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, e.g. ``"se_resnet50"``.
        num_classes: size of the classifier output.
        **overrides: constructor arguments replacing the variant's defaults, e.g.
            ``stride_in_1x1=False``, ``zero_init_last_bn=True``, ``dropout=0.2``, ``channels_last=True``.

    Returns:
        The model, in training mode, on the default device.

    Raises:
        ValueError: unknown name or unknown override; the message lists the accepted ones.
    """
    _check_name(name)
    unknown = sorted(set(overrides) - _OPTIONS[name])
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"accepted: {', '.join(sorted(_OPTIONS[name] - {'num_classes'}))}"
        )
    return _BUILDERS[name](num_classes=num_classes, **overrides)


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
