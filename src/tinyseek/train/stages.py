"""The registered training stages, and a run of several in order (`stages: [pretrain, sft]`): the last stage writes
to the run's out_dir, each earlier one to out_dir/NAME, and each later one starts from the weights of the one
before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tinyseek.train.config import TrainConfig
from tinyseek.train.sft import CHAT_FINE_TUNING
from tinyseek.train.stage import PRETRAINING, Stage

STAGES: dict[str, Stage] = {"pretrain": PRETRAINING, "sft": CHAT_FINE_TUNING}


def stage_runs(config: TrainConfig) -> Iterator[tuple[TrainConfig, Stage]]:
    """(the configuration the stage trains with, the stage) for each of config.stages in order. A stage's
    configuration is made when the one before has finished, so that it can start from its checkpoint."""
    out_dir = Path(config.out_dir)
    init_from = config.init_from
    for position, name in enumerate(config.stages):
        stage = STAGES[name]
        last = position == len(config.stages) - 1
        staged = config.model_copy(deep=True, update={
            "stages": [name], "init_from": init_from, "out_dir": str(out_dir if last else out_dir / name),
        })
        settings = stage.settings(staged)
        yield settings, stage
        init_from = settings.out_dir
