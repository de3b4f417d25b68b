"""The data section of the run config: its schema lives in :mod:`core.data_config`, with the other sections' in core,
so that the run config (core.run_config) is composed at the bottom of the stack."""

from core.data_config import *  # noqa: F401,F403
