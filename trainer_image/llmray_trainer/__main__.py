"""RayJob entrypoint: `python -m llmray_trainer --config /etc/llmray/trainer.json`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmray.paths import pod_path
from llmray.progress import format_line
from llmray.trainer_config import TrainerConfig
from llmray_trainer.launcher import run

MESSAGE_LIMIT = 4000
log = logging.getLogger("llmray.trainer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmray_trainer")
    parser.add_argument("--config", required=True, help="resolved trainer config (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with pod_path(args.config).open() as f:
        cfg = TrainerConfig.model_validate(json.load(f))
    try:
        result = run(cfg)
    except Exception as exc:
        # Ray makes the last 10 lines of the driver's log the Ray job's message, which KubeRay
        # copies into the RayJob: the traceback first, then the error as one progress record,
        # which the operator puts into the FineTuneJob's Failed condition.
        log.exception("fine-tuning failed")
        print(format_line({"event": "failed", "message": failure_message(exc)}), flush=True)
        return 1
    print(f"llmray: model exported to {result.model_uri}", flush=True)
    return 0


def failure_message(exc: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """What the user reads in the FineTuneJob's Failed condition."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
