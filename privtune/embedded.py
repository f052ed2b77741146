"""The embedded benchmarks: data sets and tiny base models shipped inside the package.

`data.source` / `model.base` accept `embedded` (the default benchmark, `portraits`) or `embedded:<name>`.
* `emoji`: Noto emoji at 32 px and the tiny SD pre-trained on them (`assets/emoji`, `assets/tiny-sd`);
  the fine-tuning pool is the base's own distribution, so the duplicated-data extraction benchmark uses it.
* `portraits`: DiceBear cartoon portraits with compositional captions (`assets/portraits`) and a tiny
  SD pre-trained on four base styles (`assets/tiny-sd-portraits`); the fine-tuning pool is a style
  the base never saw, so a LoRA has something to learn, and an attribute classifier measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class Embedded:
    name: str
    data: Path
    model: Path
    description: str


EMBEDDED = {
    "emoji": Embedded("emoji", ASSETS / "emoji" / "emoji.parquet", ASSETS / "tiny-sd",
                      "embedded emoji set"),
    "portraits": Embedded("portraits", ASSETS / "portraits" / "portraits.parquet", ASSETS / "tiny-sd-portraits",
                          "embedded portraits set"),
}
DEFAULT = "portraits"


def is_embedded(value) -> bool:
    return str(value) == "embedded" or str(value).startswith("embedded:")


def embedded(value) -> Embedded:
    """The benchmark named by `embedded` (the default) or `embedded:<name>`; unknown names list the valid ones."""
    text = str(value)
    name = DEFAULT if text == "embedded" else text.partition(":")[2]
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded benchmark {text!r}; valid: embedded, "
                          + ", ".join(f"embedded:{n}" for n in EMBEDDED))
    return EMBEDDED[name]
