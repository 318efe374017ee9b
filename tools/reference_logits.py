#!/usr/bin/env python
"""`gptneox-reference-logits` from a checkout; the tool is gptneox/cli/reference_logits.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptneox.cli.reference_logits import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
