"""3D instance segmentation from a predicted per-object distance map.

Pure array code (no model, no torch):

* :mod:`.targets`: the regression target, each object's distance to its boundary normalised
  to [0, 1] per object, so touching objects are separated by a valley;
* :mod:`.postprocess`: seeded watershed of a (predicted) distance map into an instance label
  volume (needs the optional extra ``instances``: scikit-image);
* :mod:`.metrics`: the Cell Tracking Challenge measures SEG, DET and OP_CSB, object-level
  precision / recall / F1 at IoU >= 0.5 and the count error;
* :mod:`.thresholds`: grid search of the two watershed thresholds maximising mean OP_CSB.

Volumes are ``(X, Y, Z)`` arrays, as everywhere in this project. Nothing is imported here.
"""
