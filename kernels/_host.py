"""Integer helpers for the launchers' host code. Triton's own (``triton.cdiv``, ``triton.next_power_of_2``) are
constexpr functions in Triton 3.9, callable from Python but at 2.5 to 5 us a call on these machines, and a launcher
makes several per launch (GroupNorm's split plans up to nine): the launchers use these plain ones."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
