"""Evidence that pretraining taught a teacher something: frozen features vs random init vs raw intensities.

On data never used for pretraining (the FSL MNI152 T1 templates of
:data:`dinov2.data.classification_sample.TEMPLATES`, labelled by the Harvard-Oxford atlas), a
linear probe (:mod:`.probe`) is trained on all labelled examples of the right hemisphere and
tested on the left one. Its L2 penalty (and the raw baseline's pooling) is chosen by grouped
K-fold cross-validation inside the right hemisphere (``--cv-folds``, default 4), whose folds are
made of whole cubic blocks of item centres (``--cv-block-mm``, default 48), dealt so that every
fold holds every lobe, so neighbouring, overlapping inputs mostly fall in one fold
(``--cv-grouping z-slabs``: the former folds, contiguous slabs along world z; ``--cv-buffer``:
fit without anything that shares voxels with the held-out fold; :mod:`.folds`); the chosen
penalty is refitted on all right-hemisphere examples. The left hemisphere is used for nothing
but the final score. Two tasks:

* **patch** (:mod:`.patch_task`): the ``N^3``-voxel cube centred on each classification_sample
  site (``--patch-size N``, default 16 = its 32 mm patches; larger cubes add context, with the
  other hemisphere blanked to air) -> the lobe at its centre; features = the normalised CLS
  token and mean patch token, concatenated;
* **dense** (:mod:`.dense_task`): every token of a window -> the majority lobe of the cortex in
  its cube; features = the token's normalised patch feature.

Each task is probed on features read from the last block (rows ``patch``, ``dense``) and from
the last four blocks concatenated (``patch_last4``, ``dense_last4``: DINOv2's linear evaluation
of a ViT), for every network alike (``--last-blocks``, :mod:`.features`). The last block is the
one the DINO head is trained on, and the most specialised to that objective.

Representations: every teacher given, random-init backbones of the same architecture (several
seeds), and the raw intensities of the same input average-pooled to ``g^3`` values (:mod:`.baselines`). The
pretraining datalist named in each teacher's config is checked for the evaluation files and
their near-duplicates (:mod:`.held_out`); if it lists one, the result is marked as no evidence.

Command line::

    python -m dinov2.eval.evidence --teacher out/eval/training_99/teacher_checkpoint.pth
    python -m dinov2.eval.evidence --teacher out/eval/training_99/teacher_checkpoint.pth --patch-size 32
    python -m dinov2.eval.evidence --teacher out/eval/training_99/teacher_checkpoint.pth --cv-grouping z-slabs

From Python::

    from dinov2.eval.evidence import run_evidence
    evidence = run_evidence(["teacher_checkpoint.pth"], random_seeds=3, patch_size=32)
    evidence["tasks"]["patch"]["margins"]["teacher_minus_random"]        # last block
    evidence["tasks"]["patch_last4"]["margins"]["teacher_minus_random"]  # last four blocks
    evidence["tasks"]["dense"]["teacher"]["per_seed"][0]["cv_by_l2"]  # mean CV score per L2
    evidence["tasks"]["patch"]["description"]["cv"]["by_fold"]  # each fold's lobes, what it was fitted on
"""

from .errors import EvidenceError
from .held_out import EVALUATION_FILES, NEAR_DUPLICATE_FILES, held_out_files, pretraining_overlap
from .run import run_evidence

__all__ = ["EVALUATION_FILES", "NEAR_DUPLICATE_FILES", "EvidenceError", "held_out_files", "pretraining_overlap",
           "run_evidence"]
