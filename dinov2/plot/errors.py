"""The one error of the plot command: what is missing and what to do."""

from dinov2.utils.errors import UserError


class PlotError(UserError, ValueError):
    """A run folder with nothing to plot, a damaged file, or matplotlib missing; the message says which."""
