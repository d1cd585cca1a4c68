"""modalimmune-jax: ModalImmune (arXiv 2602.16197) and missing-modality baselines.

Layers, imports only running downward:

* pure math: :mod:`spectral`, :mod:`curvature`, :mod:`hypergrad`;
* data, metrics and the missing-modality protocol: :mod:`data`,
  :mod:`metrics`, :mod:`protocol`;
* the model, the training loop and the command line above them.
"""

from modalimmune_jax import curvature, hypergrad, spectral

__version__ = "0.1.0"

__all__ = ["curvature", "hypergrad", "spectral", "__version__"]
