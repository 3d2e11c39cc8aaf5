"""Generations of a volume's copies and the table that decides what two copies do when they meet.

Sans-IO: `model` and `decide` are pure; `store` reads and writes one small file.
"""

from .decide import (
    RULES,
    Decision,
    Facts,
    Outcome,
    Policy,
    Relation,
    Rule,
    SeqRange,
    Side,
    decide,
    give_up,
    relate,
)
from .model import MAX_HISTORY, Generation, Lineage, LineageError, Rng, Role
from .store import LineageCorruption

__all__ = [
    "MAX_HISTORY",
    "RULES",
    "Decision",
    "Facts",
    "Generation",
    "Lineage",
    "LineageCorruption",
    "LineageError",
    "Outcome",
    "Policy",
    "Relation",
    "Rng",
    "Role",
    "Rule",
    "SeqRange",
    "Side",
    "decide",
    "give_up",
    "relate",
]
