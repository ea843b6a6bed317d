"""Command-line interface: `ctc-drafter generate|demo|distill|train|eval|report`."""
