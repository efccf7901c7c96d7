#!/usr/bin/env python3
"""Draw 3GSync's architecture diagrams with Graphviz.

    python3 tools/draw_diagrams.py            # writes img/architecture-{get,put}.{dot,png}
    python3 tools/draw_diagrams.py --check    # exit 1 if the committed .dot files are stale

GET mode: the workers run on a GCE managed instance group and read their keys from Secret
Manager. PUT mode: the workers run on an EC2 Auto Scaling group with an instance role and read
the GCS HMAC keys from SSM Parameter Store. The DOT source is generated here and kept beside each
PNG, so ``--check`` compares text (Graphviz's PNG bytes vary between versions) and needs no
renderer; rendering needs ``dot`` (Debian package graphviz).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

IMG_DIR = Path(__file__).resolve().parents[1] / "img"
DPI = 96
FONT = "DejaVu Sans"

AWS = {"color": "#d47800", "fillcolor": "#fff4e5"}
GCP = {"color": "#1a73e8", "fillcolor": "#e8f0fe"}
HOST = {"color": "#5f6368", "fillcolor": "#ffffff"}
WORKER = {"color": "#188038", "fillcolor": "#e6f4ea"}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str           # "get" / "put": the file name
    title: str
    compute: str        # the cloud whose machines run the workers: "aws" / "gcp"
    group: str          # the machine group's label
    credentials: str    # the credential store's label
    credentials_edge: str
    source_auth: str    # how the workers sign S3 requests
    dest_auth: str      # and GCS requests


MODES = (
    Mode("get", "3GSync, GET mode: workers on Google Compute Engine",
         compute="gcp",
         group="GCE managed instance group\\n(autoscaling, Spot VMs welcome)",
         credentials="Secret Manager\\nsecret: {source, destination} keys",
         credentials_edge="secretAccessor\\n(VM service account)",
         source_auth="AWS access key from the secret",
         dest_auth="HMAC key from the secret,\\nor the VM service account"),
    Mode("put", "3GSync, PUT mode: workers on Amazon EC2",
         compute="aws",
         group="EC2 Auto Scaling group\\n(instance role, Spot welcome)",
         credentials="SSM Parameter Store\\nSecureString: GCS HMAC key",
         credentials_edge="GetParameter\\n(with decryption)",
         source_auth="instance role",
         dest_auth="HMAC key from SSM"),
)


def quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def attrs(**values: str) -> str:
    return "[" + ", ".join(f"{key}={quote(value)}" for key, value in values.items()) + "]"


def cluster(name: str, label: str, style: dict[str, str], body: list[str]) -> list[str]:
    """A subgraph box; nested clusters are just more body lines."""
    return [f"subgraph cluster_{name} {{",
            f"  label={quote(label)}; style=\"rounded,filled\"; color={quote(style['color'])}; "
            f"fillcolor={quote(style['fillcolor'])}; penwidth=1.6;",
            *(f"  {line}" for line in body),
            "}"]


def node(name: str, label: str, style: dict[str, str], shape: str = "box", **extra: str) -> str:
    return f"{name} " + attrs(label=label, shape=shape, color=style["color"],
                              style="rounded,filled" if shape == "box" else "filled",
                              fillcolor="#ffffff", **extra) + ";"


def edge(source: str, target: str, label: str = "", **extra: str) -> str:
    values = {"label": label, **extra} if label else extra
    return f"{source} -> {target}" + (" " + attrs(**values) if values else "") + ";"


def worker_cluster() -> list[str]:
    """One worker process: consumer, job threads, part threads, memory, metrics."""
    body = [
        node("consumer", "consumer thread\\nlong poll (20 s) for free slots;\\n"
             "visibility heartbeat per message", WORKER),
        node("jobs", "job threads x MaxParallelFile\\none object each; duplicate?\\n"
             "(HEAD destination) then ack", WORKER),
        node("parts", "part threads x MaxThread per job\\nranged GET pinned to ETag / versionId,\\n"
             "UploadPart with Content-MD5", WORKER),
        node("memory", "part bytes in memory only:\\n"
             "at most MaxParallelFile x\\nMaxThread x ChunkSize", WORKER, shape="cylinder"),
        node("metrics", "/metrics on MetricsPort:\\nbytes, objects, failures,\\n"
             "in-flight jobs, queue lag", WORKER, shape="note"),
        "{ rank=same; parts; memory; }",
        edge("consumer", "jobs", "job"),
        edge("jobs", "parts", "part plan\\n(resume: ListParts)"),
        edge("parts", "memory", "", dir="both"),
    ]
    return cluster("worker", "3GSync worker: systemd unit, user gsync, stateless", WORKER, body)


def diagram(mode: Mode) -> str:
    compute_style = GCP if mode.compute == "gcp" else AWS
    aws_body = [
        node("s3", "S3 source bucket", AWS),
        node("sqs", "SQS queue\\n(visibility timeout, 14 days)", AWS),
        node("dlq", "SQS dead-letter queue", AWS),
        node("ddb", "DynamoDB table, Key = bucket/key\\nversionId, progress, status\\n"
             "(TTL on endTime)", AWS, shape="cylinder"),
    ]
    gcp_body = [
        node("gcs", "GCS destination bucket\\nXML API (S3-compatible);\\n"
             "whole-object CRC32C check", GCP),
    ]
    compute = cluster("group", mode.group, compute_style, worker_cluster()) + [
        node("creds", mode.credentials, compute_style, shape="component")]
    if mode.compute == "gcp":
        gcp_body = compute + gcp_body
    else:
        aws_body += compute

    lines = [
        "// Generated by tools/draw_diagrams.py; edit that script, not this file.",
        f"digraph architecture_{mode.name} {{",
        f"  graph [label={quote(mode.title)}, labelloc=t, fontsize=22, fontname={quote(FONT)}, "
        f"rankdir=TB, compound=true, newrank=true, nodesep=0.4, ranksep=0.5, pad=0.25, "
        f"bgcolor=\"white\"];",
        f"  node [fontname={quote(FONT)}, fontsize=12, penwidth=1.3, margin=\"0.16,0.08\"];",
        f"  edge [fontname={quote(FONT)}, fontsize=10, color=\"#444444\", fontcolor=\"#222222\"];",
    ]
    lines += ["  " + line for line in cluster("aws", "AWS (source)", AWS, aws_body)]
    lines += ["  " + line for line in cluster("gcp", "Google Cloud (destination)", GCP, gcp_body)]
    lines += ["  " + line for line in [
        "{ rank=same; s3; jobsender; }",
        # PUT: SSM sits with the other AWS services; GET: Secret Manager beside the workers.
        "{ rank=same; sqs; dlq; ddb; %s}" % ("creds; " if mode.compute == "aws" else ""),
        "{ rank=same; consumer; %smetrics; }" % ("creds; " if mode.compute == "gcp" else ""),
        "{ rank=same; jobs; prom; }",
        node("jobsender", "jobsender (backfill, tools/)\\ndiffs S3 against GCS,\\n"
             "sends the missing as jobs", HOST),
        node("prom", "Prometheus /\\nCloud Monitoring", HOST, shape="ellipse"),
        edge("s3", "sqs", "ObjectCreated\\nevent", penwidth="2"),
        edge("sqs", "dlq", "after\\nmaxReceiveCount", style="dashed"),
        edge("s3", "jobsender", "list", style="dotted"),
        edge("jobsender", "sqs", "SendMessageBatch", style="dashed"),
        edge("sqs", "consumer", "Receive / ChangeVisibility /\\nDelete when verified", dir="both",
             penwidth="2"),
        edge("s3", "parts", f"ranged GetObject\\n({mode.source_auth})", penwidth="2",
             color="#d47800"),
        edge("parts", "gcs", f"UploadPart + Content-MD5,\\nCompleteMultipartUpload\\n"
             f"({mode.dest_auth})", penwidth="2", color="#1a73e8"),
        edge("jobs", "ddb", "versionId, progress", dir="both", constraint="false"),
        edge("creds", "consumer", mode.credentials_edge, style="dashed"),
        edge("consumer", "metrics", style="invis"),
        edge("metrics", "prom", "scrape", style="dotted", dir="back"),
    ]]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_source: str, png: Path) -> None:
    dot = shutil.which("dot")
    if dot is None:
        raise SystemExit("draw_diagrams: Graphviz's dot is missing (apt-get install graphviz)")
    subprocess.run([dot, "-Tpng", f"-Gdpi={DPI}", "-o", str(png)], input=dot_source, text=True,
                   check=True)


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for mode in MODES:
        source = diagram(mode)
        (out_dir / f"architecture-{mode.name}.dot").write_text(source)
        render(source, out_dir / f"architecture-{mode.name}.png")
        print(f"wrote {out_dir / f'architecture-{mode.name}.png'}")


def check(out_dir: Path) -> int:
    """0 if every committed .dot equals what this script draws now (and its PNG exists)."""
    stale = 0
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            fresh = Path(tmp) / f"architecture-{mode.name}.dot"
            fresh.write_text(diagram(mode))
            committed = out_dir / fresh.name
            png = committed.with_suffix(".png")
            old = committed.read_text() if committed.exists() else ""
            if old != fresh.read_text() or not png.exists():
                stale += 1
                print(f"stale: {committed.with_suffix('')} (run tools/draw_diagrams.py)")
                sys.stdout.writelines(difflib.unified_diff(
                    old.splitlines(True), fresh.read_text().splitlines(True),
                    str(committed), "regenerated", n=1))
    if not stale:
        print("diagrams are current")
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the committed DOT sources with fresh ones; exit 1 if stale")
    parser.add_argument("--out", type=Path, default=IMG_DIR,
                        help="folder of the diagrams (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.out)
    write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
