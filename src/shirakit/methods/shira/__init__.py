"""SHiRA, Sparse High-Rank Adapters (arXiv 2406.13175): everything that is SHiRA's own.

- :mod:`.adapter`      ``ShiraConfig`` and ``ShiraAdapter``: the layer maths, an InWeightAdapter
- :mod:`.masks`        which K = r*(in+out) entries to train: random, struct, wm, grad, snip
- :mod:`.calibration`  grad / snip masks from calibration batches (``calibrate``, ``compute_masks``)
- :mod:`.sparse`       kernels: SDDMM value gradient, the scattered-weight linear, the scatter
- :mod:`.compact`      the compact file layout (delta-coded uint16 indices, <= 6 bytes per value)
"""

from .adapter import ShiraAdapter, ShiraConfig
from .masks import MASKS

__all__ = ["MASKS", "ShiraAdapter", "ShiraConfig"]
