"""RayJob entrypoint: `python -m llmray_trainer --config /etc/llmray/trainer.json`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmray.trainer_config import TrainerConfig
from llmray_trainer.launcher import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmray_trainer")
    parser.add_argument("--config", required=True, help="resolved trainer config (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with open(args.config) as f:
        cfg = TrainerConfig.model_validate(json.load(f))
    result = run(cfg)
    print(f"llmray: model exported to {result.model_uri}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
