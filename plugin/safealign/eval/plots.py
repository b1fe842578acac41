"""matplotlib without a display (the Agg backend, chosen before pyplot loads) and figures as PNG bytes:
what the report and the sweep's heat map draw with."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "png"]


def png(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards: a report draws dozens)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
