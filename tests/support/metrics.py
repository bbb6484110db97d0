"""Reading /_proxy/metrics in tests: every line checked, samples by name and labels."""

from __future__ import annotations

import re

import requests

_SAMPLE = re.compile(r"^(llmproxy_[a-z_]+)(\{[^}]*\})? (\S+)$")
_TYPE = re.compile(r"^# TYPE (llmproxy_[a-z_]+) (counter|gauge|histogram)$")


class Scrape(dict):
    """{'name{labels}': value} of one scrape, with ``types``: {family: counter|gauge|histogram}."""

    types: dict[str, str]

    def counters(self) -> dict[str, float]:
        """The samples that may only grow: counters, and histograms' buckets, sums and counts."""
        wanted = {name for name, kind in self.types.items() if kind == "counter"}
        histograms = [name for name, kind in self.types.items() if kind == "histogram"]
        for name in histograms:
            wanted.update((name + "_bucket", name + "_sum", name + "_count"))
        return {key: value for key, value in self.items() if key.split("{")[0] in wanted}


def scrape(url: str) -> Scrape:
    response = requests.get(url + "/_proxy/metrics", headers={"Connection": "close"}, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = Scrape()
    samples.types = {}
    for line in response.text.splitlines():
        if not line or line.startswith("# HELP "):
            continue
        if line.startswith("#"):
            match = _TYPE.match(line)
            assert match, f"not a TYPE line: {line!r}"
            samples.types[match.group(1)] = match.group(2)
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        key = match.group(1) + (match.group(2) or "")
        assert key not in samples, f"sample repeated: {line!r}"
        samples[key] = float(match.group(3))
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``llmproxy_<name>`` over the samples that carry every given label."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        value
        for key, value in samples.items()
        if key.split("{")[0] == "llmproxy_" + name and all(w in key for w in wanted)
    )
