"""transferlab: fast, reproducible transfer-learning experiments on small image sets."""

from .predict import load_classifier
from .study import probe, run_probe

__all__ = ["load_classifier", "probe", "run_probe"]
__version__ = "0.1.0"
