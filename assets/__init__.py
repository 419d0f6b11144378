"""Data the package ships."""
