"""Image folders: inspection and conversion (inspect), class folders and splits (folders),
and the tf.data pipeline (pipeline). Only `inspect` opens image files with Pillow."""
