"""fusedecay.demo — pre-train a small GPT with AdamW, AdamHD, AdamC and ScionC and check the papers' claims.

    python -m fusedecay.demo                      # tiny model, CPU, a few minutes
    python -m fusedecay.demo --device cuda --size gpt2-124m

See docs/demo.md for the model, the corpus, the hyperparameters (and their sources) and the outputs.
"""
from .cli import main

__all__ = ["main"]
