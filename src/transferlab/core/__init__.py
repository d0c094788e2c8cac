"""Shared foundations with no knowledge of images or models: errors, config fields, files and locks, hashing, devices, the predictions file."""
