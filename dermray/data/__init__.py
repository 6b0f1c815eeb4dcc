"""Data: from a collection in storage to validated manifests and augmented uint8 batches."""
