"""One module per kernel. Importing these never imports TensorFlow."""
