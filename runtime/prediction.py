"""`Prediction`, the result record every interface returns (Python API, conversations, manifests,
HTTP). Its own module so the modules that only read results (conversation, outputs) need not
import the predictor that makes them. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Prediction:
    """One result: the arg-max label, probabilities by label (in dmf.json's label order) and the
    raw log-probabilities the model returned. `truncated`: the clip was longer than the model's
    window (input_samples / sample_rate), so only its first window was scored."""

    label: str
    probabilities: dict[str, float]
    log_probs: tuple[float, ...] = field(repr=False, default=())
    truncated: bool = False
    names: dict[str, str] = field(repr=False, default_factory=dict)  # label -> display name (dmf.json)

    @property
    def label_name(self) -> str:
        return self.names.get(self.label, self.label)

    def top(self, k: int) -> list[dict[str, Any]]:
        """The k most probable labels, most probable first: [{"label", "name", "probability"}]."""
        ranked = sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]
        return [{"label": lab, "name": self.names.get(lab, lab), "probability": p} for lab, p in ranked]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "label_name": self.label_name, "probabilities": dict(self.probabilities),
                "truncated": self.truncated}
