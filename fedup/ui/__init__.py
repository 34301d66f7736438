"""What a person sees of a run: the terminal display and the federation page.

* :mod:`fedup.ui.board`: the run as seen from here, one small model both draw;
* :mod:`fedup.ui.follow`: a running peer's events onto a board;
* :mod:`fedup.ui.folder`: a run's output folder onto a board;
* :mod:`fedup.ui.display`: the live terminal panel (rich) and the plain lap lines;
* :mod:`fedup.ui.page` and :mod:`fedup.ui.server`: the read-only federation page
  (Starlette, served by hypercorn's trio worker).

Nothing is imported here, so that each command loads only what it uses.
"""
