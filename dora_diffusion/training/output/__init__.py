"""What a training run writes: the output folder's records and lock (``rundir``), checkpoints, the step log,
validation images, the model card and the Hub upload."""
