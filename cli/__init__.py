"""`w2sctl`, the composition root: parse, validate, call a service function, print.

One module per command group; `cli.main` imports them and adds them to the root group.
"""
