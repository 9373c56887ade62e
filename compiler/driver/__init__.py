"""The build driver: a plain list of stage objects run in order over one typed state.

A new stage is a class in stages/ added to the list in driver/build.py; the driver knows no stage's
internals (see compiler/stages/base.py for what a stage declares).
"""
