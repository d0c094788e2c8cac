"""Using a trained model: export to a model folder and predict from it."""
