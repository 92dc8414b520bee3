"""How every study measures and reports: timed repeats after warm-up with the peak memory, the machine, map
errors between two sets of maps, and the report files (KIND.json, KIND.md, KIND.png)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from igcam_engine.benchmarks.memory import PeakMemory
from igcam_engine.maps import normalize


def measure(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    with PeakMemory() as memory:
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
    return {"median_s": statistics.median(samples), "p90_s": float(np.percentile(samples, 90)),
            "p95_s": float(np.percentile(samples, 95)), "peak_rss_mb": memory.megabytes, "samples": samples}


def against_peer(rows: list, name: str, label: str, engine, peer, warmup: int, repeats: int, log) -> dict:
    """The engine and a peer computing the same maps, timed alike, with the normalized map difference; appends the
    row to `rows` and logs it."""
    engine_maps, peer_maps = engine(), peer()
    row = {"method": label, "engine": measure(engine, warmup, repeats), "peer": measure(peer, warmup, repeats),
           "normalized_error": map_errors(engine_maps, peer_maps)[0]}
    row["ratio"] = row["peer"]["median_s"] / row["engine"]["median_s"]
    log(f"  {name:30s} {label:22s} engine {ms(row['engine']['median_s']):>9s}  pytorch-grad-cam "
        f"{ms(row['peer']['median_s']):>9s}  x{row['ratio']:.1f}  max normalized Δ {row['normalized_error']:.1e}")
    rows.append(row)
    return row


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__}


def map_errors(maps: np.ndarray, reference: np.ndarray):
    """(normalized max |difference|, 1 - correlation), worst over the maps."""
    a, b = normalize(maps).astype(np.float64), normalize(reference).astype(np.float64)
    deltas = np.abs(a - b).max(axis=(-2, -1))
    correlations = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    return float(deltas.max()), float(1 - min(correlations))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def write(kind: str, report: dict, markdown: str, out: Path, plot=None) -> None:
    """KIND.json (every sample), KIND.md (tables) and, with `plot(report, axis)`, KIND.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{kind}.md").write_text(markdown + "\n")
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed (install the bench extra: pip install '.[bench]'): no plot")
            return
        figure, axis = plt.subplots(figsize=(8, 4.5))
        plot(report, axis)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / f"{kind}.png", dpi=110)
        plt.close(figure)
