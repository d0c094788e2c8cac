"""transferlab: fast, reproducible transfer-learning experiments on small image sets."""

from .study import probe, run_probe

__all__ = ["probe", "run_probe"]
__version__ = "0.1.0"
