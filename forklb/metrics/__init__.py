"""Metrics: counters in shared memory written by workers, read by the sidecar.

* :mod:`forklb.metrics.segment`: the master's stats segment (one region per
  child *slot*, a header the master writes) and the name tables.
* :mod:`forklb.metrics.recorder`: the worker's (and sidecar's) writer: a few
  integer increments per request, offsets precomputed at start.
* :mod:`forklb.metrics.collector`: the sidecar's prometheus-client collectors,
  summing all slots at scrape time.
"""
