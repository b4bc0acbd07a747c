"""scikit-learn's 8x8 digits (``reslab[digits]``), a tiny dataset that ships with the package."""

from __future__ import annotations

import numpy as np
import torch

from reslab.engine.data.base import ArrayDataset, channel_stats
from reslab.errors import UsageError


def load_digits() -> ArrayDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError(
            "the digits dataset needs scikit-learn; install it with pip install 'reslab[digits]'"
        ) from None
    d = load_digits()
    # 0..16 grey levels -> 0..255; a fixed split (every 5th image is test), not seed dependent
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    test = torch.arange(len(y)) % 5 == 0
    train_x, train_y, test_x, test_y = x[~test], y[~test], x[test], y[test]
    mean, std = channel_stats(train_x)
    classes = tuple(str(i) for i in range(10))
    # digits are not mirror symmetric; 8x8 images take a 1-pixel jitter at most
    return ArrayDataset("digits", train_x, train_y, test_x, test_y, 10, classes, mean, std, False, 1)
