"""Results that display themselves in Jupyter: ``_repr_html_`` and ``show()``.

Every result type mixes in :class:`NotebookView` and defines ``_view_html(full, **view)``,
an HTML fragment from its method's ``view.py``. The fragment is wrapped with the shared
style scoped to ``.tll`` (so a notebook's own styles are untouched) and a width cap that
scrolls sideways instead of stretching the cell. Nothing loads from the network: tables and
grids are plain HTML, circuitsvis components carry their bundled JS inline.
"""

from __future__ import annotations

import logging

from tl_lenses.viz.brief import brief_repr
from tl_lenses.viz.html import SCOPED_STYLE

logger = logging.getLogger("tl_lenses")


def notebook_html(body: str) -> str:
    """``body`` as one self-contained notebook-cell fragment (scoped style, scroll, no CDN).

    Args:
        body: an HTML fragment built with :mod:`tl_lenses.viz.html`.

    Returns:
        The fragment inside ``<div class="tll">`` with the style it needs.
    """
    return (f"<div class='tll' style='max-width:100%;overflow-x:auto'>"
            f"<style>{SCOPED_STYLE}</style>{body}</div>")


def display_html(html: str) -> bool:
    """Display ``html`` in the running IPython kernel; log how to see it otherwise.

    Args:
        html: a complete fragment (see :func:`notebook_html`).

    Returns:
        True when it was handed to IPython's display, False when there is no kernel.
    """
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        # Outside a kernel IPython would print "<IPython.core.display.HTML object>".
        logger.warning("show() displays in a Jupyter notebook (IPython kernel), and none is "
                       "running; write result.to_html() to a file and open it instead")
        return False
    display(HTML(html))
    return True


class NotebookView:
    """Mixin for result dataclasses: the main view inline in Jupyter, and ``show()``.

    Subclasses define ``_view_html(full=False, **view) -> str``. ``full=False`` is the
    notebook's automatic display: for a large result a summary with a note naming the call
    that shows everything; ``show()`` displays the full view (options as the view takes).
    Dataclass subclasses declare ``repr=False`` to keep the one-line ``repr`` below (a
    dataclass's own repr printed every tensor and token: tens of thousands of characters).
    """

    __repr__ = brief_repr

    def _view_html(self, full: bool = False, **view) -> str:
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return notebook_html(self._view_html(full=False))

    def show(self, full: bool = True, **view) -> None:
        """Display this result's view in the notebook (all of it unless ``full=False``).

        Args:
            full: show the complete view even when it is large.
            **view: options of this result's view (e.g. ``statistic="rank"``).
        """
        display_html(notebook_html(self._view_html(full=full, **view)))


__all__ = ["NotebookView", "display_html", "notebook_html"]
