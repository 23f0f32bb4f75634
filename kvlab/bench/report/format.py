"""Formats shared by every report: numbers in tables, the title every report.md opens with, and the
issue bars a report checks."""


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


def bar(description: str, sign: str, target: float, measured: float, unit: str = "x") -> dict:
    """One bar of an issue as measured in this run: met when `measured` `sign` (<= or >=) `target`;
    `unit` is how the table prints both ("x" a ratio, "%" a percentage)."""
    met = measured <= target if sign == "<=" else measured >= target
    return {
        "description": description,
        "sign": sign,
        "target": target,
        "measured": measured,
        "met": met,
        "unit": unit,
    }


def bars_table(bars: list[dict]) -> list[str]:
    """The bars as a Markdown table; a missed bar is marked in bold."""
    lines = ["| bar | target | measured | met |", "|---|---:|---:|---|"]
    for item in bars:
        met = "yes" if item["met"] else "**NO (missed)**"
        unit = item.get("unit", "x")
        lines.append(
            f"| {item['description']} | {item['sign']} {item['target']:.2f}{unit} | "
            f"{item['measured']:.2f}{unit} | {met} |"
        )
    return lines
