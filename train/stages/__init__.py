"""Training stages: each file holds only its data preparation and its loss."""
