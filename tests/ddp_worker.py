"""Run by tests/test_train.py under `accelerate launch --num_processes 2`: train, then dump this rank's weights."""

import os
import sys

from safetensors.torch import save_file

from tokenizer.common.config import load_config
from tokenizer.train import train

cfg = load_config("ssdd.yaml", sys.argv[1:])
model = train(cfg)
rank = int(os.environ.get("RANK", 0))
state = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(state, os.path.join(cfg.ckpt_dir, f"rank{rank}.safetensors"))
print(f"rank {rank} done")
