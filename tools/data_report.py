#!/usr/bin/env python
"""`gptneox-data-report` from a checkout; the tool is gptneox/cli/data_report.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptneox.cli.data_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
