"""The base class every package's config derives from.

Unknown keys are refused (``extra="forbid"``) so that a typo in a YAML recipe fails before any work
starts instead of silently falling back to a default.
"""

import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _numeric_only(annotation) -> bool:
    """Whether a field takes numbers but not booleans (``int``, ``float | None``, …)."""
    args = typing.get_args(annotation) or (annotation,)
    return bool({int, float} & set(args)) and bool not in args


class StrictConfig(BaseModel):
    """A config section: typed fields, unknown keys refused, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value, info: ValidationInfo):
        # pydantic reads True as 1 in lax mode; `--set train.steps=true` is a mistake, not one step.
        if isinstance(value, bool) and info.field_name in cls.model_fields and \
                _numeric_only(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not a boolean")
        return value

    def to_yaml(self) -> str:
        """The config as YAML with every default spelled out (what run directories store)."""
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
