"""Time and peak memory of reading a realistic-size ShareGPT file, as every rank does at start.

    python bench/read_data.py --records 60000 --file /tmp/sharegpt_bench.json

Writes (once; reused if present) a synthetic ShareGPT V3 file of --records conversations shaped like the real
one (pretty-printed JSON array, 2-12 turns of a few hundred to a few thousand characters, some odd speakers and
empty conversations), then reads it in a fresh process with the vicuna source, keeping the conversations as
training does, and prints wall time, peak RSS and peak RSS / file size. --whole_file measures, for
comparison, parsing the file with one json.load (what the reader did before it streamed). --arrow writes the
same records once more as a folder like `datasets`' save_to_disk (Arrow IPC stream shards, 1,000 rows a
batch) and reads that instead. Never commit the generated files.
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


def write_saved_dataset(source: Path, folder: Path, rows_per_shard: int = 20000) -> None:
    """The records of `source` as `Dataset.save_to_disk` lays them out (shards, dataset_info.json, state.json),
    written 1,000 rows at a time."""
    import pyarrow as pa

    from gptneox.data.readers import BadRecords, read_records
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("id", pa.string()), ("conversations", pa.list_(turn))])
    total = sum(1 for _ in read_records(source, BadRecords(False)))
    names = [f"data-{i:05d}-of-{-(-total // rows_per_shard):05d}.arrow" for i in range(-(-total // rows_per_shard))]
    folder.mkdir(parents=True)
    records = (record for _, record in read_records(source, BadRecords(False)))
    for name in names:
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for _ in range(rows_per_shard // 1000):
                rows = [record for _, record in zip(range(1000), records)]  # range first: no record lost
                if rows:
                    writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))


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
        from gptneox.data.files import dataset_files
        read = read_units("vicuna", dataset_files("vicuna", str(path), "."))
        conversations = sum(len(u) for u in read.units)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024), "conversations": conversations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=60000)
    parser.add_argument("--file", type=Path, default=Path("/tmp/sharegpt_bench.json"))
    parser.add_argument("--whole_file", action="store_true", help="json.load the whole file instead of streaming")
    parser.add_argument("--arrow", action="store_true", help="read a save_to_disk folder of the same records")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.file, args.whole_file)))
        return
    if not args.file.exists():
        print(f"writing {args.records} records to {args.file} ...", flush=True)
        write_file(args.file, args.records)
    read_path = args.file
    if args.arrow:
        read_path = args.file.with_name(args.file.stem + "_saved")
        if not read_path.exists():
            print(f"writing the records as a save_to_disk folder {read_path} ...", flush=True)
            write_saved_dataset(args.file, read_path)
    size_mib = sum(p.stat().st_size for p in ([read_path] if read_path.is_file() else read_path.iterdir())) / 2**20
    command = [sys.executable, __file__, "--child", "--file", str(read_path)]
    command += ["--whole_file"] if args.whole_file else []
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    baseline = json.loads(subprocess.run([sys.executable, "-c", "import resource, gptneox.data.datasets; "
                                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                                         capture_output=True, text=True, check=True,
                                         cwd=Path(__file__).resolve().parents[1]).stdout)
    print(f"file {read_path}: {size_mib:.0f} MiB; {'json.load' if args.whole_file else 'streaming reader'}: "
          f"{result['seconds']} s, peak RSS {result['peak_rss_mib']} MiB "
          f"({result['peak_rss_mib'] / size_mib:.2f} x the file; the interpreter and imports alone: "
          f"{baseline / 1024:.0f} MiB), {result['conversations']} conversations kept")


if __name__ == "__main__":
    main()
