"""The base class every package's config derives from.

Unknown keys are refused (``extra="forbid"``) so that a typo in a YAML recipe fails before any work
starts instead of silently falling back to a default.
"""

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """A config section: typed fields, unknown keys refused, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def to_yaml(self) -> str:
        """The config as YAML with every default spelled out (what run directories store)."""
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
