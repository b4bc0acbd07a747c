"""Layer ``nn``: residual techniques, the blocks and models they plug into, the technique
registry and plugins, pretrained loading, parameter and FLOP counts, weight files.

The lowest layer: it imports nothing else of reslab but the shared leaves
(``reslab.errors``, ``reslab.files``). Imports nothing heavy itself, so that
``reslab --help`` does not load torch.
"""
