"""The cleaning report of `owngpt prepare`: what came in, what each rule changed or dropped, what went out.

Every reader and cleaning rule reports through one `Report`: `drop(rule)` for records removed, `change(rule)` for
records modified, `count(name)` for anything else worth telling (chat-export readers add their own counters, e.g.
`report.count("whatsapp.media_omitted")`, `report.count("redacted.phone", example="call me at <PHONE>")`).
Each keeps a few short examples, so a user can see *why* a rule fired. The report is printed as a table and saved
as `report.json` in the data dir.

Examples are stored as given: callers that handle private data must pass redacted examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES = 3
EXAMPLE_CHARS = 120


def shorten(text: str, limit: int = EXAMPLE_CHARS) -> str:
    """A one-line preview of `text` for examples (newlines shown as ⏎, long text cut with …)."""
    s = text.replace("\r", "").replace("\n", "⏎")
    return s if len(s) <= limit else s[: limit - 1] + "…"


@dataclass
class Rule:
    """One named rule or counter: how many records it touched, and a few examples."""

    kind: str  # "dropped" | "changed" | "count"
    count: int = 0
    examples: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)  # e.g. chars_removed

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, **self.extra, "examples": list(self.examples)}


class Report:
    """Counters by rule name, in first-use order (so the printed table follows the pipeline)."""

    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}
        self.totals: dict[str, Any] = {}

    def _add(self, kind: str, name: str, n: int, example: str | None, where: str | None, **extra: int) -> None:
        rule = self.rules.get(name)
        if rule is None:
            rule = self.rules[name] = Rule(kind)
        rule.count += n
        for k, v in extra.items():
            rule.extra[k] = rule.extra.get(k, 0) + int(v)
        if example is not None and len(rule.examples) < MAX_EXAMPLES:
            ex = shorten(example)
            rule.examples.append(f"{where}: {ex}" if where else ex)

    def drop(self, rule: str, example: str | None = None, where: str | None = None, n: int = 1, **extra: int) -> None:
        """Record `n` records dropped by `rule` (example: the dropped text, where: file:line)."""
        self._add("dropped", rule, n, example, where, **extra)

    def change(self, rule: str, example: str | None = None, where: str | None = None, n: int = 1, **extra: int) -> None:
        """Record `n` records modified by `rule` (kept, but different from the input)."""
        self._add("changed", rule, n, example, where, **extra)

    def count(self, name: str, n: int = 1, example: str | None = None, where: str | None = None, **extra: int) -> None:
        """A named counter for anything else (sessions found, names pseudonymized, placeholders inserted...)."""
        self._add("count", name, n, example, where, **extra)

    def wants_example(self, name: str) -> bool:
        """Whether `name` still collects examples (lets callers skip building an example string)."""
        rule = self.rules.get(name)
        return rule is None or len(rule.examples) < MAX_EXAMPLES

    def get(self, name: str) -> int:
        return self.rules[name].count if name in self.rules else 0

    def dropped(self) -> int:
        return sum(r.count for r in self.rules.values() if r.kind == "dropped")

    def to_dict(self) -> dict[str, Any]:
        return {**self.totals, "rules": {name: r.to_dict() for name, r in self.rules.items()}}

    def format_table(self) -> str:
        """The report as a plain-text table for the terminal."""
        t = self.totals
        unit = t.get("unit", "documents")
        lines = []
        io = t.get("in", {}), t.get("out", {})
        if io[0] or io[1]:
            lines.append(f"{'':<14}{'in':>14}{'out':>14}")
            for key, label in (
                ("documents", unit),
                ("invalid", "invalid"),
                ("chars", "characters"),
                ("tokens", "tokens"),
            ):
                a, b = io[0].get(key), io[1].get(key)
                if (a is None and b is None) or (key == "invalid" and not a):
                    continue
                lines.append(f"{label:<14}{_num(a):>14}{_num(b):>14}")
        if self.rules:
            lines.append("")
            lines.append(f"{'rule':<28}{'kind':<9}{'count':>9}  example")
            for name, r in self.rules.items():
                ex = r.examples[0] if r.examples else ""
                lines.append(f"{name:<28}{r.kind:<9}{r.count:>9}  {shorten(ex, 70)}")
        for split, s in t.get("splits", {}).items():
            n = s.get("documents", s.get("examples", 0))
            lines.append(f"{split}: {n:,} {unit}, {s.get('tokens', 0):,} tokens, {s.get('chars', 0):,} characters")
        return "\n".join(lines)


def _num(x: Any) -> str:
    return "" if x is None else f"{x:,}"
