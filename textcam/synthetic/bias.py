"""Planted spurious correlations: parsing ``class=attribute:value@strength`` and applying them.

A bias ``circle=background:water@0.98`` means, in the biased splits (train by default):

* an image whose label is ``circle`` gets ``background = water`` with probability 0.98 (otherwise
  a background other than water), and
* an image of any *other* class that drew ``water`` is moved to another background with
  probability 0.98,

so the cue predicts the class in both directions; a cue present in most circles but also common
elsewhere is not a shortcut a classifier needs. Probe and test splits are generated without biases,
so the test split holds bias-conflicting images of every class and the accuracy gap is measurable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_SPEC = re.compile(r"^\s*([\w-]+)\s*=\s*([\w-]+)\s*:\s*([\w-]+)\s*@\s*([0-9]*\.?[0-9]+)\s*$")


class BiasSpecError(ValueError):
    """A bias specification that cannot be parsed or names something the world does not have."""


@dataclass(frozen=True)
class BiasSpec:
    """One planted correlation: images of class ``label`` get ``attribute = value`` w.p. ``strength``."""

    label: str
    attribute: str
    value: str
    strength: float

    @classmethod
    def parse(cls, spec: str) -> BiasSpec:
        """Parse ``"circle=background:water@0.98"`` (strength in [0, 1])."""
        m = _SPEC.match(spec)
        if m is None:
            raise BiasSpecError(
                f"bad bias spec {spec!r}: expected CLASS=ATTRIBUTE:VALUE@STRENGTH, "
                "e.g. 'circle=background:water@0.98' or 'triangle=watermark:yes@1.0'"
            )
        label, attribute, value, strength = m.groups()
        s = float(strength)
        if not 0.0 <= s <= 1.0:
            raise BiasSpecError(f"bad bias spec {spec!r}: strength {s} must be in [0, 1]")
        return cls(label=label, attribute=attribute, value=value, strength=s)

    def __str__(self) -> str:
        return f"{self.label}={self.attribute}:{self.value}@{self.strength:g}"

    def validate(self, values: Mapping[str, Sequence[str]], label_attribute: str) -> None:
        """Raise :class:`BiasSpecError` unless class, attribute and value exist in this world."""
        if self.label not in values[label_attribute]:
            raise BiasSpecError(
                f"bias {self}: unknown class {self.label!r}; classes are {list(values[label_attribute])}"
            )
        if self.attribute == label_attribute or self.attribute not in values:
            allowed = sorted(a for a in values if a != label_attribute)
            raise BiasSpecError(f"bias {self}: attribute must be one of {allowed}, got {self.attribute!r}")
        if self.value not in values[self.attribute]:
            raise BiasSpecError(
                f"bias {self}: unknown value {self.value!r} for {self.attribute}; "
                f"values are {list(values[self.attribute])}"
            )


def parse_biases(
    specs: Sequence[str | BiasSpec], values: Mapping[str, Sequence[str]], label_attribute: str
) -> tuple[BiasSpec, ...]:
    """Parse and validate a list of specs; one class may carry at most one bias per attribute."""
    out = tuple(s if isinstance(s, BiasSpec) else BiasSpec.parse(s) for s in specs)
    seen: dict[tuple[str, str], BiasSpec] = {}
    claimed: dict[tuple[str, str], BiasSpec] = {}
    for b in out:
        b.validate(values, label_attribute)
        if (b.label, b.attribute) in seen:
            raise BiasSpecError(
                f"biases {seen[(b.label, b.attribute)]} and {b} both set {b.attribute} for {b.label}"
            )
        if (b.attribute, b.value) in claimed:
            raise BiasSpecError(f"biases {claimed[(b.attribute, b.value)]} and {b} claim the same cue")
        seen[(b.label, b.attribute)] = b
        claimed[(b.attribute, b.value)] = b
    for attr in {b.attribute for b in out}:
        if len({b.value for b in out if b.attribute == attr}) >= len(values[attr]):
            raise BiasSpecError(f"biases claim every value of {attr}: leave one free for the other classes")
    return out


def apply_biases(
    codes: dict[str, np.ndarray],
    values: Mapping[str, Sequence[str]],
    biases: Sequence[BiasSpec],
    label_attribute: str,
    rng: np.random.Generator,
) -> None:
    """Rewrite attribute codes in place so that the planted correlations hold (see module doc)."""
    if not biases:
        return
    labels = codes[label_attribute]
    for attr in dict.fromkeys(b.attribute for b in biases):
        group = [b for b in biases if b.attribute == attr]
        names = list(values[attr])
        n_values = len(names)
        claimed = np.zeros(n_values, dtype=bool)
        claimed[[names.index(b.value) for b in group]] = True
        free = np.flatnonzero(~claimed)
        col = codes[attr]
        owned = np.zeros(col.shape, dtype=bool)
        for b in group:
            v = names.index(b.value)
            cls = labels == values[label_attribute].index(b.label)
            owned |= cls
            hit = rng.random(col.shape) < b.strength
            others = np.delete(np.arange(n_values), v)
            alt = others[rng.integers(0, others.size, col.shape)]
            col[cls] = np.where(hit, v, alt)[cls]
        # Images of other classes that landed on a claimed cue are moved off it with that cue's strength.
        strength = np.zeros(n_values)
        strength[[names.index(b.value) for b in group]] = [b.strength for b in group]
        move = ~owned & claimed[col] & (rng.random(col.shape) < strength[col])
        col[move] = free[rng.integers(0, free.size, int(move.sum()))]
