"""``fedup-peer demo``: a real federation of synthetic lenders on this host, with baselines.

:func:`run_demo` starts ``--peers`` real ``fedup-peer start`` processes
(:mod:`fedup.demo.peers`), each with its own lender's loan book, lets them
find each other, form a federation and train; then trains the baselines and
compares (:mod:`fedup.demo.report`) and draws ``loss_curves.png``
(:mod:`fedup.demo.plot`).
"""

from fedup.demo.runner import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
