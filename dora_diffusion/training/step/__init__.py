"""One training step: the micro-batch's denoising loss (``step``, ``loss``), the optimiser (``optim``) and
pivotal tuning's new tokens (``pivotal``)."""
