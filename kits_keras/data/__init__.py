"""Cases to training patches: TFDS build, preprocessing, tf.data, augment."""
