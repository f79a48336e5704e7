"""Data: reading the formats users have (``decathlon``, ``nifti``, ``hc18``, ``openkbp``,
``synthetic``), a run's cases and split (``dataset``), preprocessing once (``cache``,
``preprocess``), batches (``loader``), on-device augmentation (``augment``) and checks
(``check``)."""
