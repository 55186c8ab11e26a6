"""fastalign inside other libraries' trainers. Each integration is its own module, imported explicitly, so that
``import fastalign.integrations`` pulls in none of those libraries:

* :mod:`fastalign.integrations.trl` — TRL's ``SFTTrainer``, ``DPOTrainer`` and ``GRPOTrainer`` with fastalign's
  fused log-prob kernel in place of TRL's LM head (needs ``pip install trl``).
"""

__all__: list[str] = []
