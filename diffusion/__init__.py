"""Sampling math and pipelines."""
