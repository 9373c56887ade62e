"""The build's stages, one object each: load, calibrate, reference, export, precision, passes,
engine, validate, quality, package.

Each stage says which BuildState fields it reads and writes, when it is skipped and why, its cache
key (from its own inputs; the driver chains upstream keys), the files it saves to and restores from
the stage cache, and its section of report.json.
"""
