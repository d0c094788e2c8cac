"""Inputs of a cut: the frozen prefix run once per image (extraction, cache, runtimes), the batch sources training reads, augmentation."""
