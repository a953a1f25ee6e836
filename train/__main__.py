"""``python -m tritium.train``: the per-rank entry point for deepspeed / torchrun launches."""
from tritium.train.cli_train import main

raise SystemExit(main())
