"""forklb: a pre-fork gevent HTTP load balancer configured in nginx's language."""

__version__ = "0.1.0"
