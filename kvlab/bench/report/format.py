"""Number formats shared by every report table."""


def format_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def format_mib(num_bytes: float | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f}"
