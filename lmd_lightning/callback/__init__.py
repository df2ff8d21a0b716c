"""LMDCompression and its Lightning-side helpers. `surgery` is the only module touching Lightning internals."""

from lmd_lightning.callback.checkpoint import LMDCheckpointMixin, load_compressed
from lmd_lightning.callback.lmd_compression import LMDCompression, LMDCompressionBase

__all__ = ["LMDCheckpointMixin", "LMDCompression", "LMDCompressionBase", "load_compressed"]
