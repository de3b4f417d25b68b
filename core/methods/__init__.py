"""Anomaly-detection methods, one file each, registered by name.

A method subclasses :class:`core.methods.base.Method`, which names every hook the trainer calls (config,
groups, phases, score, G_ema networks, snapshot, feature statistics, sample score) and the defaults of a
single-network method; registration checks it.

It is single-device code: the trainer owns devices, precision, ranks, optimisers and checkpoints.
Adding a method is its own file in this package with one ``@register_method("name")`` line: every module
here but ``base.py`` is imported on the first lookup (``METHODS``, a :class:`core.registry.Registry`).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError, model_validator
from pydantic_core import PydanticCustomError

from core.config import StrictConfig
from core.registry import Registry

def _check(name: str, cls: type) -> None:
    from core.methods.base import check_method_class

    check_method_class(name, cls)  # a method missing a piece fails when it is added
    cls.method_name = name


# Every module of this package but base.py is imported on the first lookup: a method is its file. A lab's
# own methods, outside tessera: TESSERA_METHOD_MODULES=mylab.methods,other.module (imported in every
# process, ranks and Ray workers included, since they inherit the environment).
METHODS = Registry("method", package="core.methods", skip={"base"}, env="TESSERA_METHOD_MODULES", check=_check)
register_method = METHODS.register
method_names = METHODS.names
method_class = METHODS.get


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
