"""transferkit: transfer learning on image folders, the Keras recipe in three commands."""

import os

# Keras 3 picks its backend at first import; transferkit is built on TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's C++ chatter (CPU features, missing CUDA, a collective's E-lines when a worker
# dies) is noise for CLI users: what matters reaches them as an error transferkit words
# itself. --verbose shows it all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.2.0"  # run format 2: plain Keras models (0.1 runs: transferkit upgrade)
