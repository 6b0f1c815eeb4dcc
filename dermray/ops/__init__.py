"""Operations: the model registry and the nightly retrain-and-promote cycle."""
