"""Helpers shared by keras_coat, its command lines, training and conversion."""
