"""Converters from public PyTorch weights to Flax parameter trees."""
