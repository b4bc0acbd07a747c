"""Layer ``probe``: gradient flow and signal propagation of residual models, at init or
trained: per-block measurements, verdicts, the probe file format and its figures.
"""
