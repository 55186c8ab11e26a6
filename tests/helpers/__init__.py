"""What the test modules share: tiny models and tokenizers, the float64 oracle, emulated CUDA devices, the code
reward's attacks, and the input builders and trainer setups more than one test module uses. Test modules import
from here (``from helpers.tiny import ...``: pyproject.toml puts tests/ on the path), never from each other."""
