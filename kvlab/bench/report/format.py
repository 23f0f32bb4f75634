"""Formats shared by every report: numbers in tables, and the title every report.md opens with."""


def format_ms(seconds: float) -> str:
    milliseconds = seconds * 1000
    # Below 1 ms (a GPU's floor, a kernel) one decimal would print 0.0.
    return f"{milliseconds:.3f}" if 0 < milliseconds < 1 else f"{milliseconds:.1f}"


def format_mib(num_bytes: float | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def title_lines(config: dict, command: str) -> list[str]:
    """A report's title (technique / experiment) and the command that reproduces it."""
    return [
        f"# {config['technique']} / {config['experiment_name']}",
        "",
        "Reproduce with:",
        "",
        f"    {command}",
        "",
    ]
