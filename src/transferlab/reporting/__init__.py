"""Figures and the HTML report. Reads result records (dicts / JSON files); never imports torch."""
