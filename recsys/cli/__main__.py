"""``python -m recsys.cli``: the library's commands (``python -m flows.cli`` adds pipeline and serve)."""

from recsys.cli import app
from recsys.cli.common import run

run(app)
