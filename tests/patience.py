"""How long a test waits for a subprocess, a worker or a file before calling it hung.

A guard against hangs, never a measure of speed: under load (the suite must pass on the
2-core machine with other work beside it) a step that takes 10 s idle can take several
minutes, and a test that failed then would be asserting on timing. Only a real hang should
reach this.
"""

HANG_S = 900.0
