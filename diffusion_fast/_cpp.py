"""Placeholder replaced by the C++ extension loader (issue 4)."""


def load_ops():
    return None


def has_cuda():
    return False
