"""Layer ``study``: many runs to decisions. A grid of model x technique x seed cells, the
scheduler that claims and trains them (locally, or through the cluster launchers), the
sequential decision rule and its statistics, and the readers of a results folder.

Imports ``reslab.probe``, ``reslab.engine``, ``reslab.nn`` and the shared leaves; never
``reslab.report`` (the command that runs a grid passes the report writer in).
"""
