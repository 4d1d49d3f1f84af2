"""The sidecar: one process per node beside the workers, never on the request path.

It serves the status endpoints today (``/status``: every forklb process with its
CPU time, RSS and open descriptors, read with psutil here and never in the
workers).  Metrics, the runtime API, health checks and VRRP are its later duties.
"""
