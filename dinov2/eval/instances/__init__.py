"""3D instance segmentation from a predicted per-object distance map.

A ViT backbone and a segmentation head regress, for every object, each voxel's distance to the
object's boundary normalised to [0, 1] per object; a seeded watershed splits the map into
objects. Commands: ``python -m dinov2.eval.instances train | segment | evaluate | baseline``
(:mod:`.__main__`; docs/instances.md).

Pure array code (no model, no torch):

* :mod:`.targets`: the regression target, each object's distance to its boundary normalised
  to [0, 1] per object, so touching objects are separated by a valley;
* :mod:`.postprocess`: seeded watershed of a (predicted) distance map into an instance label
  volume (needs the optional extra ``instances``: scikit-image);
* :mod:`.metrics`: the Cell Tracking Challenge measures SEG, DET and OP_CSB, object-level
  precision / recall / F1 at IoU >= 0.5 and the count error;
* :mod:`.thresholds`: grid search of the two watershed thresholds maximising mean OP_CSB.

Stacks and pictures:

* :mod:`.io`: TIFF and NIfTI image / label stacks in and out, with their spacing and affine;
* :mod:`.preview`: a PNG of the objects over the image.

The model and the commands:

* :mod:`.model`: the distance model (a segmentation head of :mod:`dinov2.eval.segmentation` with
  one sigmoid channel), its sliding-window prediction and its self-describing checkpoint;
* :mod:`.data`: datalist → stacks (every file checked first), preprocessing (intensity,
  resampling), distance targets and random training crops;
* :mod:`.train`: ``train``, segmentation finetuning's loop with the distance loss and a
  validation that searches the watershed thresholds and keeps the best model with them;
* :mod:`.segment`: ``segment``, instance labels of stacks in each input's format and space;
* :mod:`.baseline`: ``baseline``, threshold + connected components of the raw intensities;
* :mod:`.evaluate`: ``evaluate``, the measures of predictions against references.

Volumes are ``(X, Y, Z)`` arrays, as everywhere in this project. Nothing is imported here, so
``-m`` runs the commands without a double import.
"""
