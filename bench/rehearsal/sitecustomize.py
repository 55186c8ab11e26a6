"""Loaded as ``sitecustomize`` by every Python process of ``bench/gpu_check.sh``'s rehearsal (the script puts this
folder first on ``PYTHONPATH``): it hides the packages the GPU machine's image lacks, so that an import that
would fail there fails here too, and a check for them (``importlib.util.find_spec``) answers as it would there.

``FASTALIGN_REHEARSAL_HIDE``: comma-separated top-level module names (the script's default: datasets, trl,
liger_kernel, cut_cross_entropy, less those the benchmark step gets from carried wheels).
"""

import os
import sys

for _name in os.environ.get("FASTALIGN_REHEARSAL_HIDE", "").split(","):
    if _name.strip() and _name.strip() not in sys.modules:
        # `import name` now raises ModuleNotFoundError and importlib.util.find_spec(name) returns None.
        sys.modules[_name.strip()] = None
