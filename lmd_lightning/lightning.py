"""LMDCompression for the unified `lightning` package: `from lmd_lightning.lightning import LMDCompression`.

Same implementation as `lmd_lightning.LMDCompression`, but a `lightning.pytorch.Callback`, so a
`lightning.pytorch.Trainer` accepts it. Needs `pip install lightning`.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from lmd_lightning.callback.lmd_compression import LMDCompressionBase

__all__ = ["LMDCompression"]


class LMDCompression(LMDCompressionBase, Callback):
    __doc__ = LMDCompressionBase.__doc__
