"""The run config, as the command line and users import it; it lives in :mod:`core.run_config`, at the
bottom of the stack, so that trainers and tune take it without reaching up into the CLI package."""

from core.run_config import (ConfigError, DataSection, RunConfig, load_config, load_data_config, parse_override,
                             resumed_config, valid_keys)

__all__ = ["ConfigError", "DataSection", "RunConfig", "load_config", "load_data_config", "parse_override",
           "resumed_config", "valid_keys"]
