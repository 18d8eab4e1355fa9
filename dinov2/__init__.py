"""Self-supervised pretraining (DINO + iBOT + KoLeo) of 3D Vision Transformers for medical images.

Importing the package changes no global state (no logger levels, no warnings filters, no device
probing): the commands decide that in :func:`dinov2.utils.entry_point.start_entry_point`.
"""

__version__ = "0.1.0"
