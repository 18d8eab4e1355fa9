"""Compare backbones under one evaluation protocol: every backbone x task x label fraction x seed.

Example (a pretrained teacher, the published 3DINO-ViT and random init; 3 seeds)::

    python -m dinov2.eval.compare --output-dir cmp \\
        --backbones ours=runs/a/eval/training_99999/teacher_checkpoint.pth 3dino=3dino_vit.pth random \\
        --tasks seg:brain_tissue:UNETR probe:brain_lobes \\
        --data-dir brain_tissue=data/tissue brain_lobes=data/lobes \\
        --fractions 10 25 50 100 --seeds 3 seg:2 \\
        --task-args seg:--epochs=20 "seg:--eval-iters 100" probe:--epochs=10 all:--device=cuda

Tasks: ``seg:<preset>[:<head>]`` finetunes a segmentation head (``python -m
dinov2.eval.segmentation``; the head defaults to the config's, UNETR); ``probe:<preset>`` trains
linear probes on frozen features (``python -m dinov2.eval.linear``). A preset is a packaged name
(brain_tissue, btcv, brats, la, brain_lobes) or a preset YAML path.

Backbones: ``NAME=PATH`` (a teacher checkpoint), ``PATH`` (named after its file), ``random`` or
``NAME=none``: a random initialisation of ``--arch`` (default: the architecture recorded in the
first checkpoint, so random init is the same network without the pretraining). Each seed
initialises it anew.

Task arguments: ``--task-args KIND:ARGS`` adds ARGS to every run of that kind (``seg``,
``probe``, or ``all`` for both), after the comparison's own flags; ARGS is split like a shell
line and may hold any flag of that entry point or ``key=value`` config overrides. The
comparison sets the backbone, output folder, dataset, data folder, fraction, subset seed, run
seed and head itself: a task argument may not. Every run's config is resolved before the first
run starts, so a wrong argument is one ERROR line at once.

Runs: ``<output-dir>/runs/<task>/<backbone>/f<fraction>_s<seed>/`` holds the entry point's own
outputs (results.json...) and ``compare_run.json``. Running the same command again reuses every
finished run whose config is unchanged and redoes the rest (a killed segmentation run continues
from its last checkpoint), so a stopped comparison picks up where it stopped; a changed argument
reruns exactly the runs it changes. Every run of a fraction trains on the same nested subset of
the training set (``--subset-seed``): 10 % is inside 25 %, and so on.

Outputs: ``comparison.md`` (a table per task and fraction: mean ± std over seeds per backbone
and metric, the best mean of each column in bold, seeds, test cases, and the paired
difference against ``--reference`` with a bootstrap 95 % interval over the test cases, which
says when "better" is within noise), ``comparison.csv`` (the same numbers, one row per task x
fraction x backbone x metric) and, with matplotlib, ``plots/<task>_bars.png`` (error bars = std
over seeds) and ``plots/<task>_fractions.png`` (the paired metric vs label fraction, when
several fractions were run). Exit code 1 when a run failed: the tables hold the runs that finished.
"""
