"""Hostile inputs to the embedded server, case by case (see ``conftest.py`` for the harness).

Every case gets its documented answer, and afterwards the server must still serve, nothing the
case started may be left in the process table, nothing outside the working directory may have
been read or written, and no upload may be left half-extracted. Servers run with small caps,
and each case exceeds a cap by a little, so the suite stays fast and the machine safe.
"""
