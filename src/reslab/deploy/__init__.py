"""Layer ``deploy``: a trained model without its technique's cost. Folding BatchNorm and the
technique's merge into plain convolutions (``fuse``), the fused file format, export to
other runtimes, and prediction from any of them.
"""
