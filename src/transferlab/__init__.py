"""transferlab: fast, reproducible transfer-learning experiments on small image sets."""

from transferlab.api import probe, run_probe
from transferlab.core.version import __version__
from transferlab.deploy.predict import load_classifier
from transferlab.models.backbone import load_backbone

__all__ = ["__version__", "load_backbone", "load_classifier", "probe", "run_probe"]
