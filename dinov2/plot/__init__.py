"""PNG curves of a run, for a cluster without TensorBoard: ``python -m dinov2.plot RUN_DIR``.

Reads what the run already wrote and renders one PNG per concern into ``RUN_DIR/plots/``:

* a pretraining run (``training_metrics.json``, :mod:`dinov2.train.metrics`):
  ``losses.png`` (every loss term; log scale where positive), ``learning.png`` (DINO / iBOT
  losses and teacher entropy over their uniform values, with the collapse line at 1 and the
  small recipe's targets), ``schedules.png`` (LR, weight decay, teacher temperature, EMA
  momentum), ``collapse_monitors.png`` (teacher entropy against ``ln K`` and the watch's
  threshold, prototype-usage entropy, CLS effective rank with their thresholds), and
  ``throughput.png`` (samples/s and the data-loader wait share);
* a segmentation run (``results.json`` with ``curves``, :mod:`dinov2.eval.segmentation`):
  ``finetuning.png`` (training loss on a log scale, LR, validation mean Dice with the best
  iteration marked);
* a linear-probe run (``metrics.jsonl``, :mod:`dinov2.eval.linear`): ``probe_grid.png``
  (validation accuracy of every head of the grid over iterations, the best one highlighted).

Pretraining, segmentation finetuning and the linear probe call :func:`plot_at_end` when they
finish, so the PNGs are there without asking. matplotlib is an optional extra (``pip install matplotlib``); without it the command says so
in one line and nothing else breaks.

From Python::

    from dinov2.plot import plot_run
    written = plot_run("runs/my_run")     # list of PNG paths
"""

from .errors import PlotError
from .run import plot_at_end, plot_run

__all__ = ["PlotError", "plot_at_end", "plot_run"]
