"""PII detection quality of slmify.scrub on a generated, labelled corpus.

Builds tests/pii_corpus.py's corpus (25 values per claimed format, each in a sentence,
plus values that must survive: order ids, reservations, flights, dates, prices, UUIDs,
versions, git hashes, counts, tracking numbers, ZIP codes) and prints, per type and per
format: recall (the value is gone from the scrubbed text), precision (detections of the
type that fall on a labelled value of that type, against those on a value of another
type or anywhere in a must-survive sentence), and the share of must-survive values
changed. The corpus is written by the same hands as the detectors: it shows what is
claimed and that it holds, not how real logs with unseen formats fare.

    .venv/bin/python bench/bench_pii.py [--seed 7]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pii_corpus import build  # noqa: E402

from slmify.scrub import Scrubber  # noqa: E402
from slmify.scrub_detect import find_pii  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    recall_hit, recall_n = Counter(), Counter()
    detected, correct = Counter(), Counter()
    keep_changed, keep_n = Counter(), Counter()
    for s in build(args.seed):
        out = Scrubber().text(s.text, "f")
        start = s.text.index(s.value)
        span = (start, start + len(s.value))
        for kind, _, a, b in find_pii(s.text):
            on_value = a < span[1] and b > span[0]
            if s.kind != "KEEP" and not on_value:
                continue  # unlabelled (the IP host in a database URL): neither way
            detected[kind] += 1
            correct[kind] += on_value and s.kind == kind
        if s.kind == "KEEP":
            keep_n[s.fmt] += 1
            keep_changed[s.fmt] += s.value not in out
        else:
            recall_n[s.kind, s.fmt] += 1
            recall_hit[s.kind, s.fmt] += s.value not in out
    print(f"{'type':10} {'format':12} {'recall':>8} {'n':>4}")
    for kind, fmt in sorted(recall_n):
        n = recall_n[kind, fmt]
        print(f"{kind:10} {fmt:12} {recall_hit[kind, fmt] / n:8.1%} {n:4}")
    print(f"\n{'type':10} {'recall':>8} {'precision':>10} {'detections':>11}")
    for kind in sorted({k for k, _ in recall_n}):
        hits = sum(v for (k, _), v in recall_hit.items() if k == kind)
        n = sum(v for (k, _), v in recall_n.items() if k == kind)
        precision = correct[kind] / detected[kind] if detected[kind] else float("nan")
        print(f"{kind:10} {hits / n:8.1%} {precision:10.1%} {detected[kind]:11}")
    total = sum(keep_n.values())
    changed = sum(keep_changed.values())
    print(f"\nmust-survive values changed: {changed}/{total} ({changed / total:.1%})")
    for fmt in sorted(keep_n):
        if keep_changed[fmt]:
            print(f"  {fmt}: {keep_changed[fmt]}/{keep_n[fmt]}")


if __name__ == "__main__":
    main()
