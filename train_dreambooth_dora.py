#!/usr/bin/env python
"""DreamBooth DoRA (or LoRA) training for SDXL.

    accelerate launch train_dreambooth_dora.py --dataset linoyts/3d_icon

All flags: ``python train_dreambooth_dora.py --help``. The logic lives in ``dora_diffusion.training``.
"""

import sys

from dora_diffusion.extras import MissingExtraError
from dora_diffusion.training import CheckpointError, DatasetError, OutputDirError, TrainingError, TrainingInterrupted, main

if __name__ == "__main__":
    try:
        main()
    except TrainingInterrupted as err:  # a checkpoint was saved; exit as the signal's shell code (143, 130)
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except (CheckpointError, DatasetError, MissingExtraError, OutputDirError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
