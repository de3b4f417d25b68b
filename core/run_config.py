"""The run config: one tree composed of each package's config, loaded from YAML plus ``--set`` overrides.

It sits in core, the bottom layer, with every section's schema (core.data_config, core.train_config,
core.tune_config; ``data_plane.config`` and the like re-export them): every package takes a validated
config from here, and core imports nothing of the packages above it (tests/test_layers.py).

Everything is validated once, before any work starts. Errors name the offending key, where it came
from (the YAML file or the ``--set`` flag) and, for unknown keys, the nearest valid key.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from core.config import StrictConfig
from core.methods import MethodConfig
from core.data_config import DataConfig
from core.train_config import TrainConfig
from core.tune_config import TuneConfig


class RunConfig(StrictConfig):
    """A whole run: what to call it, where it goes, and each package's section."""

    name: str = "run"                                 # run name; run directories are <runs_dir>/<name>-<timestamp>
    runs_dir: str = "runs"                            # parent folder of run directories
    seed: int = Field(0, ge=0)                        # global seed (streams, synthesis, initialisation)
    data: DataConfig = Field(default_factory=DataConfig)
    # a factory, not an instance: validating the default method imports every method, torch with them,
    # and `tessera ingest` (which reads only the data section) must not pay that
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)


class DataSection(StrictConfig):
    """A recipe's data section alone: what ingest reads (load_data_config); the other sections are
    left to the commands that use them."""

    data: DataConfig = Field(default_factory=DataConfig)


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem found."""


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    """The config class behind a field annotation (``X``, ``X | None``), if it is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _sub_model(arg)
            if found is not None:
                return found
    return None


def valid_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config tree, sections included (``data``, ``data.tiles``, ``data.tiles.size``)."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _sub_model(field.annotation)
        if sub is not None:
            keys.extend(valid_keys(sub, dotted + "."))
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value typed as YAML reads it)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set data.tiles.size=512")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc.problem})") from exc
    return key.strip().split("."), value


def set_key(tree: dict, path: list[str], value: Any, what: str) -> None:
    """``tree[path[0]][path[1]]… = value``, making sections on the way; ``what`` names the setting (``--set
    'x=1'``, a search key) in the error when a section on the path is a value."""
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"{what}: '{where}' is a value ({child!r}), not a section")
        node = child
    node[path[-1]] = value


def _describe(error: dict, source_of: dict[str, str], default_source: str) -> str:
    if error["type"] == "method_options":  # one line per bad option, under its full key
        context = error["ctx"]
        return "\n  ".join(_describe_option(inner, context["fields"], source_of, default_source)
                           for inner in context["errors"])
    loc = [str(part) for part in error["loc"]]
    # Unions add the member type to the location (e.g. "...magnification.float"); keep real keys only.
    known = set(valid_keys())
    dotted = ".".join(loc)
    while loc and dotted not in known and error["type"] != "extra_forbidden":
        loc.pop()
        dotted = ".".join(loc)
    source = next((source_of[k] for k in _prefixes(dotted) if k in source_of), default_source)
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(dotted, sorted(known), n=1, cutoff=0.6)
        nearest = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"{source}: unknown key '{dotted}'{nearest}"
    shown = f" (got {error['input']!r})" if not isinstance(error.get("input"), dict) else ""
    message = error["msg"].removeprefix("Value error, ")
    return f"{source}: {dotted or '<top level>'}: {message}{shown}"


def _describe_option(error: dict, fields: list[str], source_of: dict[str, str], default_source: str) -> str:
    """A problem with one of the method's options, named ``method.options.<key>``."""
    loc = [str(part) for part in error["loc"]]
    while len(loc) > 1 and loc[-1] not in fields and error["type"] != "extra_forbidden":
        loc.pop()  # union member types, as above
    dotted = ".".join(["method", "options", *loc])
    source = next((source_of[k] for k in _prefixes(dotted) if k in source_of), default_source)
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(loc[0], fields, n=1, cutoff=0.6)
        nearest = f"; did you mean 'method.options.{hint[0]}'?" if hint else ""
        return f"{source}: unknown key '{dotted}'{nearest}"
    shown = f" (got {error['input']!r})" if not isinstance(error.get("input"), dict) else ""
    return f"{source}: {dotted}: {error['msg'].removeprefix('Value error, ')}{shown}"


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def resumed_config(path: str | Path, overrides: list[str]) -> RunConfig:
    """A run directory's config.yaml with the ``--set`` overrides a resume may apply (RESUMABLE_KEYS:
    learning rates, steps, logging); any other key is refused, naming the ones allowed."""
    import fnmatch

    from core.train_config import RESUMABLE_KEYS

    for text in overrides:
        keys, _ = parse_override(text)
        if not any(fnmatch.fnmatchcase(".".join(keys), pattern) for pattern in RESUMABLE_KEYS):
            raise ConfigError(f"--set {text!r}: a resumed run keeps its config except for keys that leave the "
                              f"checkpoint valid: {', '.join(RESUMABLE_KEYS)}; to change others, start a new "
                              f"run from {path}")
    return load_config(path, overrides)


def _read_tree(path: str | Path | None, overrides: list[str] | None) -> tuple[dict, dict[str, str], str]:
    """The YAML tree with ``--set`` overrides applied, which override set which key, and the file's name."""
    tree: dict = {}
    source = str(path) if path is not None else "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot be read as text ({type(exc).__name__}: {exc})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    source_of: dict[str, str] = {}
    for text in overrides or []:
        keys, value = parse_override(text)
        set_key(tree, keys, value, f"--set {text!r}")
        source_of[".".join(keys)] = f"--set {text}"
    return tree, source_of, source


def _validated(model: type[BaseModel], tree: dict, source_of: dict[str, str], source: str):
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = [_describe(err, source_of, source) for err in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(problems))) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    return _validated(RunConfig, *_read_tree(path, overrides))


def load_data_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DataSection:
    """As load_config, for the data section only (`tessera ingest`): the method, train and tune sections
    of a recipe are not validated, so no method (nor torch) is imported. ``--set`` must name data keys."""
    for text in overrides or []:
        if parse_override(text)[0][0] != "data":
            raise ConfigError(f"--set {text}: ingest reads only the data section (data.*)")
    tree, source_of, source = _read_tree(path, overrides)
    return _validated(DataSection, {"data": tree.get("data", {})}, source_of, source)
