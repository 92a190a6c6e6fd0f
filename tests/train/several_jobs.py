"""Test helper: run several training job files one after another in one DeepSpeed rank, each
through its entry point's own ``train`` (``models.train.sft`` / ``models.train.preference``) and
``run_rank``, as the real launch does for one. A launch costs two Python processes importing torch
and DeepSpeed; the real-model matrix runs its jobs in one launch to stay within the suite's budget.

    python -m deepspeed.launcher.runner ... --module --no_local_rank tests.train.several_jobs --config jobs.json

``jobs.json``: ``{"jobs": [{"module": "models.train.sft", "config": "/path/job.json"}, ...]}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from models.train.common import leave_process_group, run_rank

CONFIGS = {"models.train.sft": "SFTConfig", "models.train.preference": "PreferenceConfig"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for job in json.loads(args.config.read_text())["jobs"]:
        module = importlib.import_module(job["module"])
        config = getattr(module, CONFIGS[job["module"]]).from_json_file(job["config"])
        run_rank(module.train, config)
    leave_process_group()  # as the real entry points do after their one job


if __name__ == "__main__":
    main()
