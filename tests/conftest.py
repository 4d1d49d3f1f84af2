"""Pytest fixtures for forklb end-to-end tests (see ``tests/harness.py``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ForkLB, HangupBackend, NginxBackend, PyBackend  # noqa: E402


@pytest.fixture
def nginx_backend_factory(tmp_path: Path) -> Iterator[Callable[..., NginxBackend]]:
    """``factory(body="ok", *, start=True, **kwargs)`` -> a (started) NginxBackend.

    Every backend created is stopped (whole process tree) at teardown.
    """
    created: list[NginxBackend] = []

    def factory(body: str = "ok", *, start: bool = True, **kwargs: Any) -> NginxBackend:
        backend = NginxBackend(tmp_path, body, **kwargs)
        created.append(backend)
        if start:
            backend.start()
        return backend

    yield factory
    for backend in reversed(created):
        backend.stop()


@pytest.fixture
def py_backend_factory(tmp_path: Path) -> Iterator[Callable[..., PyBackend]]:
    """``factory(mode="echo", *, start=True, **kwargs)`` -> a (started) PyBackend.

    Every backend created is stopped (whole process tree) at teardown.
    """
    created: list[PyBackend] = []

    def factory(mode: str = "echo", *, start: bool = True, **kwargs: Any) -> PyBackend:
        backend = PyBackend(tmp_path, mode, **kwargs)
        created.append(backend)
        if start:
            backend.start()
        return backend

    yield factory
    for backend in reversed(created):
        backend.stop()


@pytest.fixture
def forklb_factory(tmp_path: Path) -> Iterator[Callable[..., ForkLB]]:
    """``factory(conf_text, **kwargs)`` -> a NOT yet started ForkLB.

    Call ``lb.start(wait_ports=[...])`` yourself (tests of failing start-ups and ``-t`` need
    an unstarted instance). Every instance created is stopped at teardown.
    """
    created: list[ForkLB] = []

    def factory(conf_text: str, **kwargs: Any) -> ForkLB:
        lb = ForkLB(tmp_path, conf_text, **kwargs)
        created.append(lb)
        return lb

    yield factory
    for lb in reversed(created):
        lb.stop()


@pytest.fixture
def hangup_factory() -> Iterator[Callable[..., HangupBackend]]:
    """``factory(reset=True)`` -> a started HangupBackend; all are stopped at teardown."""
    created: list[HangupBackend] = []

    def factory(reset: bool = True) -> HangupBackend:
        created.append(HangupBackend(reset))
        return created[-1]

    yield factory
    for backend in created:
        backend.stop()
