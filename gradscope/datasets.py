"""Small real data that ships with gradscope, for examples, the demo and tests: nothing is downloaded.

``digits.npz`` holds the 1,797 8×8 handwritten digits of the UCI "Optical Recognition of
Handwritten Digits" set (as bundled by scikit-learn), 45 kB as uint8.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["load_digits"]


def load_digits(size: int = 28, *, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The handwritten digits as ``(images, labels)``: ``(1797, size*size)`` float32 and ``(1797,)`` int64.

    Images are upsampled bilinearly from 8×8 to ``size×size`` (28 gives the classic 784 inputs) and,
    with ``normalize``, scaled to zero mean and unit variance over the data set.
    """
    with resources.files("gradscope.data").joinpath("digits.npz").open("rb") as f:
        data = np.load(f)
        images = torch.from_numpy(data["images"].astype(np.float32) / 16.0)
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    if size != 8:
        images = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    images = images.reshape(len(images), -1)
    if normalize:
        images = (images - images.mean()) / images.std()
    return images.contiguous(), labels
