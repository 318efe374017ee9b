"""tools/slurm_train.sh with stand-ins for srun and scontrol: each rank gets the launch environment train.py needs."""
from __future__ import annotations

import json
import os
import subprocess

from tests.helpers import LAUNCH_VARIABLES, REPO

FAKE_SRUN = """#!/bin/bash
# start the command once per task, as srun would, with the variables SLURM gives each task
while [[ "$1" == --* ]]; do shift; done
for task in 0 1 2 3; do
    SLURM_PROCID=$task SLURM_LOCALID=$((task % 2)) SLURM_NTASKS=4 "$@" || exit 1
done
"""
FAKE_PYTHON = """#!/usr/bin/env python3
import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
with open(os.path.join(os.environ["RESULTS"], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump({"env": {k: os.environ[k] for k in keys}, "argv": sys.argv[1:]}, handle)
"""


def fake(directory, name, text):
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_each_rank_gets_its_rank_the_first_node_and_the_arguments(tmp_path):
    bin_dir, results = tmp_path / "bin", tmp_path / "results"
    bin_dir.mkdir(), results.mkdir()
    fake(bin_dir, "srun", FAKE_SRUN)
    fake(bin_dir, "scontrol", "#!/bin/bash\nprintf 'node7\\nnode8\\n'\n")
    python = fake(tmp_path, "python", FAKE_PYTHON)
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}  # left by in-process runs
    environment = {**inherited, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python),
                   "RESULTS": str(results), "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_SUBMIT_DIR": str(REPO)}
    run = subprocess.run(["bash", "tools/slurm_train.sh", "--configs", "defaults", "gpt-neox-20b", "--resume"],
                         cwd=REPO, env=environment, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(4)]
    for rank, seen in enumerate(ranks):
        assert seen["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank % 2), "WORLD_SIZE": "4",
                               "MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
        assert seen["argv"] == ["train.py", "--configs", "defaults", "gpt-neox-20b", "--resume", "--deepspeed"]


def test_help_and_the_warning_signal():
    run = subprocess.run(["bash", "tools/slurm_train.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage:")
    assert "#SBATCH --signal=TERM@300" in (REPO / "tools/slurm_train.sh").read_text()
