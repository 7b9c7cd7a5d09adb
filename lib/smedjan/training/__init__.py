"""Training machinery shared by every training tool (train, sft, dpo, distill).

- `loop`: the Trainer (checkpoints, resume, NaN/Inf skipping, signals, metrics, DDP).
- `schedule`: learning-rate schedules.  - `state`: state_N.bin save/restore.
- `dist`: torchrun / DDP setup.  - `files`: metrics.jsonl, state rotation.
- `pretrain`: what `smedjan train` builds from its flags.  - `bench`: throughput.

    from smedjan.training import Trainer, TrainerConfig, Schedule
    result = Trainer(model, opt, Schedule("cosine", 1000, 100), source, loss_fn,
                     TrainerConfig(tool="train", steps=1000, checkpoint_dir=Path("ckpt"))).fit()
"""

from smedjan.training.loop import BatchSource, Trainer, TrainerConfig, TrainResult
from smedjan.training.schedule import SCHEDULES, Schedule

__all__ = ["Trainer", "TrainerConfig", "TrainResult", "BatchSource", "Schedule", "SCHEDULES"]
