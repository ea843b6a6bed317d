"""The seed's data step, as its README runs it (cd ge_data first):
    python allocation.py --outdir train_data_vicuna7b --type vicuna --basemodel vicuna-7b-v1.3 --data ShareGPT.json
Runs `ctc-drafter distill` (ctc_drafter/cli/seed.py; `--help` lists the options). Set the GPU map on
line 13, as the seed's README says: [[0],[1],[2],[3]] for a process per GPU, [[0,1],[2,3]] for a
model over two GPUs per process; None runs one process, on the first GPU or on the CPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's ctc_drafter


gpus = None

if __name__ == "__main__":
    from ctc_drafter.cli import seed

    seed.script_main(seed.data_step, gpus)
