"""``ExperimentConfig``: every section of one experiment, and its plain-dict form."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fearec_dist.config.build import build_section, fold_storage_alias
from fearec_dist.config.daily import DailySection
from fearec_dist.config.data import DataSection
from fearec_dist.config.keys import option
from fearec_dist.config.model import ModelSection
from fearec_dist.config.run import RunSection
from fearec_dist.config.storage import StorageSection
from fearec_dist.config.train import TrainSection
from fearec_dist.config.tune import TuneSection


@dataclass
class ExperimentConfig:
    """One experiment: a section per concern. The CLI, the trainer and Tune pass it on as
    ``to_dict()`` and rebuild it with ``from_dict`` (checked again on the way in)."""

    data: DataSection = option(help="the input and the examples cut from it", factory=DataSection)
    model: ModelSection = option(help="the model and its own keys", factory=ModelSection)
    train: TrainSection = option(help="optimisation, evaluation, the softmax", factory=TrainSection)
    run: RunSection = option(help="the run's outputs, workers and resources", factory=RunSection)
    tune: TuneSection = option(help="the sweep: samples and the ASHA schedule", factory=TuneSection)
    storage: StorageSection = option(help="object-storage options", factory=StorageSection)
    daily: DailySection = option(
        help="the daily job: its pipeline and promotion", factory=DailySection
    )

    def __post_init__(self) -> None:
        self.data.storage = self.storage  # one object: the alias can never disagree

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; the model section is flattened to ``{"name": ..., **params}``, and
        the storage options appear once, under ``storage`` (not under the ``data`` alias)."""
        out = asdict(self)
        model = out.pop("model")
        out["model"] = {"name": model["name"], **model["params"]}
        out["data"].pop("storage")
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
        """Checks every key (``source`` names where the dict came from in errors)."""
        return build_section(cls, fold_storage_alias(raw or {}, source), "", source)
