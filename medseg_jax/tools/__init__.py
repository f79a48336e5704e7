"""Command-line tools, each ``python -m medseg_jax.tools.<name> --help``: ``check_data``
(check a data folder), ``convert_hc18`` and ``convert_openkbp`` (challenge formats to
Decathlon NIfTI folders), ``plan`` (the plan a data set gets) and ``throughput`` (speed
of any config)."""
