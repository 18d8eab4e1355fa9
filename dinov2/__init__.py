"""Self-supervised pretraining (DINO + iBOT + KoLeo) of 3D Vision Transformers for medical images."""

__version__ = "0.1.0"
