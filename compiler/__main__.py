"""`python -m compiler ...` is `llmc ...` (for environments without the console script on PATH)."""

from compiler.commands.cli import run

run()
