"""``python -m cardinal.summary``: see cardinal.summary.cli."""

from cardinal.cli import run
from cardinal.summary.cli import main

run(main)
