"""transferlab: fast, reproducible transfer-learning experiments on small image sets."""

from transferlab.deploy.predict import load_classifier
from transferlab.models.backbone import load_backbone
from transferlab.train.probe_run import probe, run_probe

__all__ = ["load_backbone", "load_classifier", "probe", "run_probe"]
__version__ = "0.1.0"
