"""``recsys`` command line: one command per pipeline stage, each usable on its own paths.

Heavy libraries (torch, mlflow) are imported inside the commands that need them so that ``recsys --help``
and the data commands start fast. The orchestration commands (``pipeline``, ``serve``) start Prefect and
so live in ``flows.cli``, which the ``recsys`` console script runs.
"""
# ruff: noqa: I001  (commands register on import: the import order is the order of `recsys --help`)

from recsys.cli.common import app
from recsys.cli import data_commands
from recsys.cli import training_commands
from recsys.cli import update_commands
from recsys.cli import tracking_commands
from recsys.cli import serving_commands

__all__ = [
    "app", "data_commands", "serving_commands", "tracking_commands", "training_commands", "update_commands",
]
