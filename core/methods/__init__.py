"""Anomaly-detection methods, one file each, registered by name.

A method subclasses :class:`core.methods.base.Method`, which names every hook the trainer calls (config,
groups, phases, score, G_ema networks, snapshot, feature statistics, sample score) and the defaults of a
single-network method; registration checks it.

It is single-device code: the trainer owns devices, precision, ranks, optimisers and checkpoints.
Adding a method is its own file plus one ``@register_method`` line.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError, model_validator
from pydantic_core import PydanticCustomError

from core.config import StrictConfig

_REGISTRY: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        from core.methods.base import check_method_class

        check_method_class(name, cls)  # a method missing a piece fails when it is added
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return add


def _load_all() -> None:
    # Importing a method's module registers it; the list is the one place that names every method file.
    import importlib
    import os

    from core.methods import (dpa, fanogan, fpi, mkd, pgan_enc, reference_ae, stylegan2,  # noqa: F401
                              stylegan2_encoder)

    # A lab's own methods, outside tessera: TESSERA_METHOD_MODULES=mylab.methods,other.module (imported in
    # every process, ranks and Ray workers included, since they inherit the environment).
    for module in filter(None, (m.strip() for m in os.environ.get("TESSERA_METHOD_MODULES", "").split(","))):
        importlib.import_module(module)


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    _load_all()
    if name not in _REGISTRY:
        import difflib

        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise KeyError(f"unknown method '{name}' (known: {', '.join(sorted(_REGISTRY))}){hint}")
    return _REGISTRY[name]


def create_method(name: str, config: dict | None = None, **overrides):
    """Build a registered method from its config (a dict validated by the method's ``Config``)."""
    cls = method_class(name)
    return cls(cls.Config.model_validate({**(config or {}), **overrides}))


class MethodConfig(StrictConfig):
    """The run config's ``method`` section: a registered name and that method's own options."""

    name: str = "reference_ae"                        # a registered method (core/methods/<name>.py)
    options: dict[str, Any] = {}                      # the method's Config fields; unknown ones are refused

    @model_validator(mode="before")
    @classmethod
    def _options_fit_the_method(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("name", "reference_ae")
        try:
            method = method_class(name)
        except KeyError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        # Fill the method's defaults so the resolved config spells every option out.
        try:
            options = method.Config.model_validate(data.get("options") or {}).model_dump(mode="json")
        except ValidationError as exc:
            # Keep each problem's own key (method.options.<key>) and the method's option names for hints;
            # tessera.config turns them into one line each, blamed on the file or --set that gave them.
            raise PydanticCustomError("method_options", "invalid options of method '{method}': {detail}", {
                "method": name, "fields": sorted(method.Config.model_fields),
                "detail": "; ".join(f"method.options.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
                "errors": [{"loc": list(e["loc"]), "type": e["type"], "msg": e["msg"], "input": e.get("input")}
                           for e in exc.errors()]}) from None
        return {**data, "options": options}
