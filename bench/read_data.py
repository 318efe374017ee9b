"""Time and peak memory of reading a realistic-size ShareGPT file, as every rank does at start.

    python bench/read_data.py --records 60000 --file /tmp/sharegpt_bench.json

Writes (once; reused if present) a synthetic ShareGPT V3 file of --records conversations shaped like the real
one (pretty-printed JSON array, 2-12 turns of a few hundred to a few thousand characters, some odd speakers and
empty conversations), then reads it in a fresh process with the vicuna source, keeping the conversations as
training does, and prints wall time, peak RSS and peak RSS / file size. --whole_file measures, for
comparison, parsing the file with one json.load (what the reader did before it streamed).
Never commit the generated file.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the model answers questions about data files and training runs with care while the user asks for "
         "more detail on every step of the process including code examples tables and long explanations").split()


def write_file(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("[\n")
        for index in range(records):
            if index % 500 == 7:
                turns = []
            else:
                speakers = ["gpt" if index % 3 == 1 else "human"]  # split pieces start with gpt
                for _ in range(rng.randrange(1, 12)):
                    speakers.append("gpt" if speakers[-1] in ("human", "user") else "human")
                if index % 400 == 3:
                    speakers[0] = "system"
                turns = [{"from": s, "value": " ".join(rng.choices(WORDS, k=rng.randrange(20, 600)))}
                         for s in speakers]
            record = {"id": f"bench{index}_{index % 3}", "conversations": turns}
            stream.write(("" if index == 0 else ",\n") + json.dumps(record, indent=2))
        stream.write("\n]\n")


def measure(path: Path, whole_file: bool) -> dict:
    """Runs in the child process: read, keep the result, report time and peak RSS."""
    start = time.perf_counter()
    if whole_file:
        from collections import Counter

        from gptneox.data.sources import vicuna
        drops: Counter = Counter()
        with open(path, encoding="utf-8") as stream:
            units = [c for record in json.load(stream) if (c := vicuna(record, drops))]
        conversations = sum(len(u) for u in units)
    else:
        from gptneox.data.datasets import read_units
        read = read_units("vicuna", path)
        conversations = sum(len(u) for u in read.units)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024), "conversations": conversations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=60000)
    parser.add_argument("--file", type=Path, default=Path("/tmp/sharegpt_bench.json"))
    parser.add_argument("--whole_file", action="store_true", help="json.load the whole file instead of streaming")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.file, args.whole_file)))
        return
    if not args.file.exists():
        print(f"writing {args.records} records to {args.file} ...", flush=True)
        write_file(args.file, args.records)
    size_mib = args.file.stat().st_size / 2**20
    command = [sys.executable, __file__, "--child", "--file", str(args.file)] + (["--whole_file"] if args.whole_file else [])
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    baseline = json.loads(subprocess.run([sys.executable, "-c", "import resource, gptneox.data.datasets; "
                                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                                         capture_output=True, text=True, check=True,
                                         cwd=Path(__file__).resolve().parents[1]).stdout)
    print(f"file {args.file}: {size_mib:.0f} MiB; {'json.load' if args.whole_file else 'streaming reader'}: "
          f"{result['seconds']} s, peak RSS {result['peak_rss_mib']} MiB "
          f"({result['peak_rss_mib'] / size_mib:.2f} x the file; the interpreter and imports alone: "
          f"{baseline / 1024:.0f} MiB), {result['conversations']} conversations kept")


if __name__ == "__main__":
    main()
