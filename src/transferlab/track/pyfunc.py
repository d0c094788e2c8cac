"""The loader of a transferlab model logged to MLflow as a pyfunc model (``mlflow.pyfunc.load_model(uri)``).

MLflow imports this module by name (the model's ``loader_module``) and calls :func:`_load_pyfunc` with the
logged model's data: an exported model folder (``transferlab export``). ``predict`` takes a table with an
``image`` column of file paths and returns one row per image: the predicted class (``label``) and one
probability column per class, named by the class, as the model's signature says. Imports no mlflow.
"""

from __future__ import annotations

from typing import Any

INPUT_COLUMN = "image"
LABEL_COLUMN = "label"


class ImageModel:
    """An exported transferlab classifier behind MLflow's pyfunc ``predict``."""

    def __init__(self, model_dir: str):
        from transferlab.deploy.predict import load_classifier

        self.classifier = load_classifier(model_dir, device="cpu")  # CPU: the numbers of training's test evaluation

    def predict(self, model_input: Any, params: dict | None = None) -> Any:
        import pandas as pd

        paths = list(model_input[INPUT_COLUMN]) if hasattr(model_input, "columns") else list(model_input)
        probs, _ = self.classifier.predict_proba(paths)
        classes = list(self.classifier.classes)
        table = pd.DataFrame(probs, columns=classes)
        table.insert(0, LABEL_COLUMN, [classes[i] for i in probs.argmax(axis=1)])
        return table


def _load_pyfunc(data_path: str) -> ImageModel:
    return ImageModel(data_path)
