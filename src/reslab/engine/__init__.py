"""Layer ``engine``: one training run. Its config, datasets and the data sources that feed
the loop, the loop itself, its callbacks, checkpoints, run folders and the step-time pass; and
:mod:`reslab.engine.packed`, which trains runs that differ only in seed as one packed model.

Imports only ``reslab.nn`` and the shared leaves.
"""
