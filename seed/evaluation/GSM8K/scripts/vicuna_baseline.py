"""The seed's GSM8K evaluation for vicuna bases, without speculation (the baseline), as its README runs it
(cd evaluation/GSM8K first): python scripts/vicuna_baseline.py --draft-model-path ... --base-model-path ...
--model-id ... --tree-choices medusa --bench-name ... --use-safetensor-weight True

Runs `ctc-drafter eval` (ctc_drafter/cli/seed.py; `--help` lists the options).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # this checkout's ctc_drafter

if __name__ == "__main__":
    from ctc_drafter.cli import seed

    seed.script_main(seed.eval_step, "gsm8k", "vicuna", True)
