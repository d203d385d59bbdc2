"""Datasets: a content-addressed format, packing and cleaning, distribution, assignment, and the loader."""
