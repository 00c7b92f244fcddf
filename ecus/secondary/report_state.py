"""What a secondary's next version report says besides its image (Uptane 2.1, 5.4.2.1).

The attacks it detected (each with the report counter at which it was
recorded, so it is cleared only once the Director accepted a report that
carried it, DESIGN 7) and the result of its last step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from uptane.errors import ATTACKS
from uptane.manifest import RESULT_CODES

MAX_ATTACKS: Final = 16
MAX_TEXT: Final = 500


def _text(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


@dataclass(frozen=True)
class ReportState:
    """What the next version report says besides the installed image.

    ``since[i]`` is the ECU's report counter when ``attacks[i]`` was recorded:
    every report with a higher counter carries it, so it is cleared once the
    Director accepted one (``cleared``).
    """

    attacks: tuple[str, ...] = ()
    last_result: str = "ok"
    last_result_text: str = ""
    since: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "attacks": list(self.attacks),
            "since": list(self.since),
            "last_result": self.last_result,
            "last_result_text": self.last_result_text,
        }

    @classmethod
    def from_dict(cls, data: object) -> ReportState:
        if not isinstance(data, Mapping):
            return cls()
        code = str(data.get("last_result", "ok"))
        raw_since = list(data.get("since", ()))
        pairs = []
        for i, attack in enumerate(data.get("attacks", ())):
            if attack not in ATTACKS:
                continue
            since = raw_since[i] if i < len(raw_since) else 0
            pairs.append((str(attack), since if isinstance(since, int) else 0))
        return cls(
            attacks=tuple(a for a, _ in pairs),
            last_result=code if code in RESULT_CODES else "internalError",
            last_result_text=_text(data.get("last_result_text", "")),
            since=tuple(n for _, n in pairs),
        )

    def with_attack(self, attack: str, counter: int) -> ReportState:
        """Record ``attack`` (again) at report counter ``counter``."""
        pairs = [(a, n) for a, n in zip(self.attacks, self.since, strict=False) if a != attack]
        pairs = [*pairs, (attack, counter)][-MAX_ATTACKS:]
        return ReportState(
            tuple(a for a, _ in pairs),
            self.last_result,
            self.last_result_text,
            tuple(n for _, n in pairs),
        )

    def cleared(self, accepted_counter: int) -> ReportState:
        """Without the attacks a report with counter ``accepted_counter`` carried."""
        pairs = [
            (a, n) for a, n in zip(self.attacks, self.since, strict=False) if n >= accepted_counter
        ]
        return ReportState(
            tuple(a for a, _ in pairs),
            self.last_result,
            self.last_result_text,
            tuple(n for _, n in pairs),
        )
