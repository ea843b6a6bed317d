"""The seed's training, as its README runs it (from seed/, the checkout of the seed's commands):

    accelerate launch --mixed_precision=bf16 train/main.py --tmpdir train_data_vicuna7b \
        --cpdir checkpoint_7b_vicuna --basepath vicuna-7b-v1.3 --configpath train/vicuna_7B_config.json --bs 1

Runs `ctc-drafter train` (ctc_drafter/cli/seed.py; `--help` lists the options and what differs).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's ctc_drafter

if __name__ == "__main__":
    from ctc_drafter.cli import seed

    seed.script_main(seed.train_step)
