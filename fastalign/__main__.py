"""``python -m fastalign``: the same as the ``fastalign`` command."""

from fastalign.cli import main

main()
