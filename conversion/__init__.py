"""PyTorch -> Keras conversion of CoaT checkpoints, with numerical verification."""
