"""Benchmarks of the CvT library against transformers 4.57.6 (see README.md in this folder)."""
