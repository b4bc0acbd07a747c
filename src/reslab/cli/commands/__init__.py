"""Sub-commands of the ``reslab`` CLI, one module each (discovered by :mod:`reslab.cli`)."""
