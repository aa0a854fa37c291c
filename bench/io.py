"""I/O figures of the data plane on this machine, against a real S3 server (SeaweedFS on loopback)
and local disk:

- ingest throughput (synthetic images; the COCO photos as a plain image prefix),
- shard read throughput from S3 and from local disk (MB/s, images/s) for several shard sizes —
  the measurement behind ``pipeline.dataset.DEFAULT_SHARD_SIZE``,
- the image column stored uncompressed vs zstd (shard size, read time; A/B interleaved),
- decode images/s on one core for the COCO photos,
- RSS while ingesting a dataset 10× larger than a shard, after each shard and at its peak
  (memory must stay flat).

    .venv/bin/python bench/io.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from _common import median, write_result  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.dataset import DEFAULT_SHARD_SIZE, SHARD_COMPRESSION, SHARD_SCHEMA, open_dataset, read_shard  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.ingest import ingest_images, ingest_synthetic  # noqa: E402
from tests.seaweed import SeaweedS3  # noqa: E402

COCO_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco" / "val2017_subset" / "images"


def read_throughput(dataset_uri: str, repeats: int) -> dict:
    dataset = open_dataset(dataset_uri)
    best = None
    for _ in range(repeats):
        started = time.perf_counter()
        images = num_bytes = 0
        for shard in dataset.shards:
            table = read_shard(shard.uri)
            images += table.num_rows
            num_bytes += shard.num_bytes
        seconds = time.perf_counter() - started
        best = seconds if best is None else min(best, seconds)
    return {
        "images_per_s": images / best,
        "mb_per_s": num_bytes / best / 1e6,
        "shards": len(dataset.shards),
        "images": images,
        "mb": num_bytes / 1e6,
    }


def image_compression_ab(photos: list[Path], repeats: int) -> dict:
    """One shard of the COCO photos written with the image column uncompressed (what we do) and
    with zstd; sizes, write and read (Parquet decode from memory) times, A/B interleaved."""
    table = pa.Table.from_pylist(
        [{"image_id": p.name, "image": p.read_bytes(), "source": str(p)} for p in photos[:256]], schema=SHARD_SCHEMA
    )
    variants = {"image_none": SHARD_COMPRESSION, "image_zstd": {**SHARD_COMPRESSION, "image": "zstd"}}
    sizes: dict[str, int] = {}
    write_s: dict[str, list[float]] = {name: [] for name in variants}
    read_s: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, compression in variants.items():
            buffer = io.BytesIO()
            started = time.perf_counter()
            pq.write_table(table, buffer, row_group_size=32, compression=compression)
            write_s[name].append(time.perf_counter() - started)
            data = buffer.getvalue()
            sizes[name] = len(data)
            started = time.perf_counter()
            pq.read_table(io.BytesIO(data))
            read_s[name].append(time.perf_counter() - started)
    return {
        "images": table.num_rows,
        "mb": {name: size / 1e6 for name, size in sizes.items()},
        "zstd_size_ratio": sizes["image_zstd"] / sizes["image_none"],
        "write_s_median": {name: median(values) for name, values in write_s.items()},
        "read_s_median": {name: median(values) for name, values in read_s.items()},
        "zstd_read_time_ratio": median(read_s["image_zstd"]) / median(read_s["image_none"]),
    }


class PeakRss:
    """Samples this process's RSS every 10 ms in a thread; ``.peak_mb`` after ``stop()``."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak_mb = self.process.memory_info().rss / 1e6
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, self.process.memory_info().rss / 1e6)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="detectflow-bench-io-"))
    photos = sorted(COCO_IMAGES.glob("*.jpg"))
    result: dict = {"coco_photos": len(photos), "coco_mb": sum(p.stat().st_size for p in photos) / 1e6}
    try:
        with SeaweedS3(work / "seaweed") as server:
            server.apply_env()
            bucket = server.new_bucket("bench")
            # Upload the photos as a plain prefix (what users have in their buckets).
            started = time.perf_counter()
            for path in photos:
                storage.write_bytes(f"{bucket}/photos/{path.name}", path.read_bytes())
            result["upload_photos_s"] = time.perf_counter() - started

            sizes = [32, 128] if args.quick else [16, 64, 128, 256]
            ingest, reads = {}, {}
            for shard_size in sizes:
                for where, root in (("s3", bucket), ("local", f"file://{work}/local")):
                    uri = f"{root}/coco-{shard_size}"
                    started = time.perf_counter()
                    source = f"{bucket}/photos" if where == "s3" else f"file://{COCO_IMAGES}"
                    ingest_images(source, uri, shard_size=shard_size)
                    seconds = time.perf_counter() - started
                    ingest[f"{where}_shard{shard_size}"] = {
                        "images_per_s": len(photos) / seconds,
                        "mb_per_s": result["coco_mb"] / seconds,
                    }
                    reads[f"{where}_shard{shard_size}"] = read_throughput(uri, 1 if args.quick else 3)
                    print(
                        where,
                        shard_size,
                        {
                            k: round(v, 1)
                            for k, v in reads[f"{where}_shard{shard_size}"].items()
                            if isinstance(v, float)
                        },
                        flush=True,
                    )
            result["ingest_coco_prefix"] = ingest
            result["shard_read"] = reads

            n = 256 if args.quick else 1024
            started = time.perf_counter()
            ingest_synthetic(f"{bucket}/synth", num_images=n, image_size=128, shard_size=256)
            result["ingest_synthetic_s3"] = {"images": n, "images_per_s": n / (time.perf_counter() - started)}

        result["image_column_compression"] = image_compression_ab(photos, 2 if args.quick else 5)
        print("compression", result["image_column_compression"], flush=True)

        # Decode on one core.
        torch.set_num_threads(1)
        datas = [p.read_bytes() for p in photos]
        started = time.perf_counter()
        for i, data in enumerate(datas):
            decode_image(data, str(i))
        seconds = time.perf_counter() - started
        result["decode_one_core"] = {"images_per_s": len(datas) / seconds}
        pixels = 0
        for data in datas[:50]:
            decoded = decode_image(data, "x")
            pixels += decoded.width * decoded.height
        result["decode_one_core"]["mean_megapixels"] = pixels / 50 / 1e6

        # Memory while ingesting 10 shards: RSS sampled after each shard.
        process = psutil.Process()
        shard_size = 64 if args.quick else 256
        samples = []

        def progress(done: int) -> None:
            if done % shard_size == 0:
                samples.append(process.memory_info().rss / 1e6)

        before_mb = process.memory_info().rss / 1e6
        peak = PeakRss()
        ingest_synthetic(
            f"file://{work}/mem", num_images=10 * shard_size, image_size=256, shard_size=shard_size, progress=progress
        )
        result["ingest_rss_mb_before"] = before_mb
        result["ingest_rss_mb_peak"] = peak.stop()
        result["ingest_rss_mb_per_shard"] = samples
        result["ingest_rss_growth_mb_shard1_to_10"] = samples[-1] - samples[0]
        result["ingest_rss_shard_size"] = shard_size
        result["default_shard_size"] = DEFAULT_SHARD_SIZE
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result("io_quick" if args.quick else "io", result)


if __name__ == "__main__":
    main()
