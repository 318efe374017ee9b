"""A stand-in Hugging Face cache for data tests, laid out as huggingface_hub writes it, and the reference's
hub datasets in it with their real file names, columns and formats (texts made up, few).

huggingface_hub stores `datasets--ORG--NAME/blobs/<id>` (the sha256 of an LFS file, the git blob sha1 of a
regular one), `snapshots/<commit>/<path>` as relative symlinks into `../../blobs/`, and `refs/main` holding
the commit without a newline. File names and columns below are those of the repos' pages on the hub (tree
listings, dataset cards' `dataset_info`) and of the reference's loaders; see README "Data" for which could
not be confirmed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
LFS_SUFFIXES = (".parquet", ".gz", ".arrow")  # in the hub's default .gitattributes, so stored with git-lfs
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.gz filter=lfs diff=lfs merge=lfs -text\n"


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], *, main: bool = True,
                 lfs: tuple[str, ...] = (), repo_type: str = "dataset") -> Path:
    """Store `files` (path in the repo -> bytes) as one snapshot; `main` points refs/main at it."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        if name.endswith(LFS_SUFFIXES) or name in lfs:
            blob_id = hashlib.sha256(data).hexdigest()
        else:
            blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / blob_id
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


def parquet_bytes(rows: list[dict], schema: pa.Schema | None = None) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue()


def card(features: list[str]) -> bytes:
    """A dataset card whose `dataset_info` lists the columns, as the hub's parquet uploads write it."""
    listed = "".join(f"  - name: {name}\n    dtype: string\n" for name in features)
    return f"---\ndataset_info:\n  features:\n{listed}  splits:\n  - name: train\n---\n".encode()


# oa_dolly_15k's data/train-*.parquet: INSTRUCTION, RESPONSE, SOURCE and METADATA {CATEGORY, CONTEXT}.
DOLLY_SCHEMA = pa.schema([("INSTRUCTION", pa.string()), ("RESPONSE", pa.string()), ("SOURCE", pa.string()),
                          ("METADATA", pa.struct([("CATEGORY", pa.string()), ("CONTEXT", pa.string())]))])
DOLLY_ROWS = [
    {"INSTRUCTION": "Who wrote The Selfish Gene?", "RESPONSE": "Richard Dawkins.", "SOURCE": "databricks-dolly-15k",
     "METADATA": {"CATEGORY": "closed_qa", "CONTEXT": "The Selfish Gene is a 1976 book by Richard Dawkins.[1]"}},
    {"INSTRUCTION": "Name a primary colour.", "RESPONSE": "Red.", "SOURCE": "databricks-dolly-15k",
     "METADATA": {"CATEGORY": "open_qa", "CONTEXT": ""}},
    {"INSTRUCTION": "Give me a fruit.", "RESPONSE": "A pear.", "SOURCE": "databricks-dolly-15k",
     "METADATA": {"CATEGORY": "brainstorming", "CONTEXT": ""}},
]
# grade-school-math-instructions' data/train-*.parquet: INSTRUCTION, RESPONSE, SOURCE (all strings).
GSM_ROWS = [
    {"INSTRUCTION": "Solve: Natalia sold 48 clips in April and half as many in May. How many in all?",
     "RESPONSE": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.",
     "SOURCE": "grade-school-math"},
    {"INSTRUCTION": "Answer this: Weng earns $12 an hour. How much for 50 minutes?",
     "RESPONSE": "Weng earns 12/60 = $0.2 per minute.\nShe earned 0.2 x 50 = $10.", "SOURCE": "grade-school-math"},
    {"INSTRUCTION": "Work out: 3 boxes of 4 pens. How many pens?", "RESPONSE": "3 x 4 = 12 pens.",
     "SOURCE": "grade-school-math"},
]
# CodeAlpaca-20k's code_alpaca_20k.json: a JSON array of instruction/input/output.
CODE_ALPACA = [
    {"instruction": "Write a Python function that adds two numbers.", "input": "",
     "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Reverse the list.", "input": "[1, 2, 3]", "output": "[3, 2, 1]"},
    {"instruction": "Call the OpenAI API.", "input": "", "output": "import openai"},
]

# Commits of the stand-in snapshots: any 40 hex digits do; these were seen on the repos' hub pages (the
# ShareGPT one is the revision the reference pinned), except CodeAlpaca's, which is made up.
COMMITS = {"OpenAssistant/oasst1": "fd7dd3fc13915d6a3bba7e4e854b940b651a4032",
           "anon8231489123/ShareGPT_Vicuna_unfiltered": "192ab2185289094fc556ec8ce5ce1e8e587154ca",
           "OllieStanley/oa_dolly_15k": "d1af295e8eccb47a97aaa01094643505e0378b53",
           "qwedsacf/grade-school-math-instructions": "6046ed39f5e7d14102388ff5dc4cc94c8826544b",
           "sahil2801/CodeAlpaca-20k": "c0de" * 10}


def oasst_rows_tables() -> tuple[pa.Table, pa.Table]:
    """The fixture's oasst message rows as the hub's two splits (train shards joined into one)."""
    shards = FIXTURES / "oasst_hub" / "data"
    train = pa.concat_tables([pq.read_table(shards / f"train-0000{i}-of-00002.parquet") for i in (0, 1)])
    return train, pq.read_table(shards / "validation-00000-of-00001.parquet")


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def reference_repos(dolly_rows: list[dict] = DOLLY_ROWS) -> dict[str, dict[str, bytes]]:
    """Each stock source's hub repo as `hf download ORG/NAME --repo-type dataset` fetches it."""
    train, validation = oasst_rows_tables()
    sharegpt = (FIXTURES / "ShareGPT_V3_unfiltered_cleaned_split.json").read_bytes()
    trees = (FIXTURES / "oasst_trees.jsonl.gz").read_bytes()
    return {
        "OpenAssistant/oasst1": {
            ".gitattributes": GITATTRIBUTES, "README.md": card(["message_id", "parent_id", "text"]),
            "2023-04-12_oasst_ready.trees.jsonl.gz": trees,  # not a split file: not among the data files
            "data/train-00000-of-00001-7eb1a25206d2071c.parquet": table_bytes(train),
            "data/validation-00000-of-00001-134b8fd0c89408b6.parquet": table_bytes(validation)},
        "anon8231489123/ShareGPT_Vicuna_unfiltered": {
            ".gitattributes": GITATTRIBUTES, "README.md": b"---\nlicense: apache-2.0\n---\n",
            "ShareGPT_V3_unfiltered_cleaned_split.json": b"[]",
            "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json": sharegpt,
            "HTML_cleaned_raw_dataset/sg_90k_part1.json": b"[]"},
        "OllieStanley/oa_dolly_15k": {
            ".gitattributes": GITATTRIBUTES, "README.md": card(["INSTRUCTION", "RESPONSE", "SOURCE"]),
            "data/train-00000-of-00001-4ad930cdd7ee7fb7.parquet": parquet_bytes(dolly_rows, DOLLY_SCHEMA)},
        "qwedsacf/grade-school-math-instructions": {
            ".gitattributes": GITATTRIBUTES, "README.md": card(["INSTRUCTION", "RESPONSE", "SOURCE"]),
            "data/train-00000-of-00001-3f5d416810641542.parquet": parquet_bytes(GSM_ROWS)},
        "sahil2801/CodeAlpaca-20k": {
            ".gitattributes": GITATTRIBUTES, "README.md": b"---\nlicense: cc-by-4.0\n---\n",
            "code_alpaca_20k.json": json.dumps(CODE_ALPACA, indent=4).encode()},
    }


def reference_cache(cache: Path) -> Path:
    """Every stock source's repo in `cache`, refs/main at its snapshot."""
    for repo_id, files in reference_repos().items():
        add_snapshot(cache, repo_id, COMMITS[repo_id], files,
                     lfs=("ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json",
                          "ShareGPT_V3_unfiltered_cleaned_split.json"))
    return cache
