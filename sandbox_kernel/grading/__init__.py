"""``sandbox-kernel grade``: a class's notebooks run headless, each question checked by its
hidden test table, the scores written as CSV (and JSON).

``cli`` (arguments, checks before anything runs), ``questions`` (the tables of ``--tests``),
``notebooks`` (reading a submission), ``runner`` (one notebook in its own kernel), ``batch``
(``--jobs`` at a time), ``progress`` (the line on stderr), ``report`` (CSV and JSON) and
``results`` (the data between them).
"""

from .cli import add_arguments, run

__all__ = ["add_arguments", "run"]
