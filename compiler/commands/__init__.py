"""The `llmc` command line: one module per command that needs more than argument parsing.

Commands parse options and print; the work is in driver/ (build) and the layers below.
"""
