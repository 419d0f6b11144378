"""Batched HTTP serving."""
