"""What a training run reads: dataset records and captions (``records``), the sample stream (``dataset``,
``sampling``, ``buckets``), class images (``prior``), the dataset fingerprint and the latent/prompt caches (``encode``)."""
