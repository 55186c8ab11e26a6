"""``fastalign demo``: the R1 recipe end to end on CPU on a synthetic task (see :mod:`fastalign.demo.run`)."""

from fastalign.demo.run import main, run_demo

__all__ = ["main", "run_demo"]
