"""The expensive stage: images → a frozen backbone, once → the HDF5 cache.

``run`` (``extract``: request key, reuse, resume), ``settings``, ``backbones`` (the registry of
backbones and layers), ``weights``, ``images`` (decoding files), ``pixels`` (the one image →
tensor path), ``gpu_decode``, ``stream`` (the streaming loop) and ``sharding``.
"""

from featprobe.extraction.run import extract

__all__ = ["extract"]
