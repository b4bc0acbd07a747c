"""Layer ``engine``: one training run. Its config, datasets and the data sources that feed
the loop, the loop itself, its callbacks, checkpoints, run folders and the step-time pass.

Imports only ``reslab.nn`` and the shared leaves.
"""
