"""The one error of the plot command: what is missing and what to do."""


class PlotError(ValueError):
    """A run folder with nothing to plot, a damaged file, or matplotlib missing; the message says which."""
