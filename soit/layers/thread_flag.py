"""A per-thread setting (on/off, or a value) with a context manager that restores the previous value."""
import contextlib
import threading

__all__ = ["ThreadFlag"]


class ThreadFlag:
    """False until :meth:`set` turns it on in a ``with`` block, in that thread only (other
    threads, e.g. data-loader workers or a server's request threads, keep their own value).
    Nested blocks restore the value they found."""

    def __init__(self):
        self._local = threading.local()

    def __bool__(self) -> bool:
        return bool(self.value)

    @property
    def value(self):
        """What :meth:`set` was given in this thread (False outside any block)."""
        return getattr(self._local, "value", False)

    @contextlib.contextmanager
    def set(self, enabled=True):
        previous = self.value
        self._local.value = enabled
        try:
            yield
        finally:
            self._local.value = previous
