"""The server's /metrics, scraped and parsed with prometheus_client's own parser.

`Scrape` keeps every sample (name, labels, value) so a report can show what the server said, and
sums samples by name and a subset of labels, which is how the bench reads a counter (e.g. requests
by status) or a gauge (KV blocks in use).
"""

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class Scrape:
    samples: list[Sample]

    @classmethod
    def parse(cls, text: str) -> "Scrape":
        """Raises ValueError (prometheus_client's) on text that is not the exposition format."""
        return cls(
            [
                Sample(sample.name, dict(sample.labels), float(sample.value))
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            ]
        )

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the samples called `name` whose labels include `labels`; None if there are none."""
        matching = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sum(matching) if matching else None

    def to_dict(self) -> list[dict]:
        return [{"name": s.name, "labels": s.labels, "value": s.value} for s in self.samples]


def scrape(
    base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0
) -> tuple[Scrape, httpx.Response]:
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    return Scrape.parse(response.text), response
