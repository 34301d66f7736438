"""How close the model-state codec gets to the cost of copying the bytes once.

Builds a state with ResNet-18's exact tensor shapes (no torchvision needed) and
times, in one run, best and median of several repetitions:

(a) the floor: ``tobytes()`` of every tensor and ``np.frombuffer`` of each back;
(m) for reference, the bare minimum of any one-copy codec: copying every
    tensor into one fresh numpy buffer, nothing else;
(b) ``encode_state`` + ``decode_state`` (numpy layer, NaN/Inf check included);
(c) ``state_to_bytes`` + ``bytes_to_state`` (torch layer, from a ``bytearray``:
    zero copy on decode);
(d) ``bytes_to_state`` alone from read-only ``bytes``, which first copies the
    blob once (torch tensors must not alias immutable memory).

Goal: (b) within 2x of (a).  Printed one line per figure: ``<path>_best_ms``,
``<path>_median_ms`` and the ratios ``codec_over_floor_median`` ((b)/(a)),
``torch_over_floor_median`` ((c)/(a)) and the same over (m).  Run
``python bench/bench_tensors.py``; ``main()`` returns the figures as a dict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedup.learn.weights import bytes_to_state, state_to_bytes
from fedup.protocol.tensors import decode_state, encode_state

REPEATS = 15


def resnet18_shapes() -> list[tuple[str, tuple[int, ...], str]]:
    """ResNet-18's state_dict: (name, shape, dtype) in torchvision's order."""
    shapes: list[tuple[str, tuple[int, ...], str]] = []

    def bn(prefix: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes.append((f"{prefix}.{leaf}", (c,), "float32"))
        shapes.append((f"{prefix}.num_batches_tracked", (), "int64"))

    shapes.append(("conv1.weight", (64, 3, 7, 7), "float32"))
    bn("bn1", 64)
    c_in = 64
    for layer, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            first_in = c_in if block == 0 else c
            shapes.append((f"{p}.conv1.weight", (c, first_in, 3, 3), "float32"))
            bn(f"{p}.bn1", c)
            shapes.append((f"{p}.conv2.weight", (c, c, 3, 3), "float32"))
            bn(f"{p}.bn2", c)
            if block == 0 and first_in != c:
                shapes.append((f"{p}.downsample.0.weight", (c, first_in, 1, 1), "float32"))
                bn(f"{p}.downsample.1", c)
        c_in = c
    shapes.append(("fc.weight", (1000, 512), "float32"))
    shapes.append(("fc.bias", (1000,), "float32"))
    return shapes


def resnet18_state() -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(0)
    state: dict[str, np.ndarray[Any, Any]] = {}
    for name, shape, dtype in resnet18_shapes():
        if dtype == "int64":
            state[name] = np.array(1, dtype=np.int64)
        else:
            state[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)
    return state


def _align8(n: int) -> int:
    return (n + 7) & -8


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()  # warm up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs), statistics.median(runs)


def main(repeats: int = REPEATS, *, verbose: bool = True) -> dict[str, float]:
    """Run the benchmark; return every figure (seconds, bytes, counts, ratios)."""
    state = resnet18_state()
    tensors = {n: torch.from_numpy(a) for n, a in state.items()}
    n_params = sum(a.size for a in state.values() if a.dtype == np.float32)
    n_bytes = sum(a.nbytes for a in state.values())

    def floor() -> None:
        blobs = [(a.tobytes(), a.dtype, a.shape) for a in state.values()]
        for b, dtype, shape in blobs:
            np.frombuffer(b, dtype).reshape(shape)

    total = sum(_align8(a.nbytes) for a in state.values())

    def memcpy() -> None:
        out = np.empty(total, np.uint8)
        offset = 0
        for a in state.values():
            out[offset : offset + a.nbytes] = a.reshape(-1).view(np.uint8)
            offset += _align8(a.nbytes)

    def codec() -> None:
        decode_state(encode_state(state))

    def torch_path() -> None:
        bytes_to_state(state_to_bytes(tensors))

    readonly_blob = bytes(state_to_bytes(tensors))

    def torch_from_bytes() -> None:
        bytes_to_state(readonly_blob)

    blob = encode_state(state)
    figures: dict[str, float] = {
        "tensors": len(state),
        "float32_parameters": n_params,
        "data_bytes": n_bytes,
        "blob_bytes": len(blob),
    }
    for key, fn in [
        ("floor", floor),
        ("memcpy", memcpy),
        ("codec", codec),
        ("torch", torch_path),
        ("torch_decode_readonly", torch_from_bytes),
    ]:
        best, median = _time(fn, repeats)
        figures[f"{key}_best_s"] = best
        figures[f"{key}_median_s"] = median
    for key in ("codec", "torch"):
        for base in ("floor", "memcpy"):
            for stat in ("best", "median"):
                figures[f"{key}_over_{base}_{stat}"] = (
                    figures[f"{key}_{stat}_s"] / figures[f"{base}_{stat}_s"]
                )
    if verbose:
        _print(figures)
    return figures


def _print(f: dict[str, float]) -> None:
    """One line per figure: sizes, then best and median per path, then the ratios."""
    for key in ("tensors", "float32_parameters", "data_bytes", "blob_bytes"):
        print(f"{key:<36}{int(f[key]):>16,}")
    for key in ("floor", "memcpy", "codec", "torch", "torch_decode_readonly"):
        for stat in ("best", "median"):
            print(f"{key}_{stat}_ms".ljust(36) + f"{f[f'{key}_{stat}_s'] * 1e3:>16.2f}")
    for key in ("codec", "torch"):
        for base in ("floor", "memcpy"):
            name = f"{key}_over_{base}_median"
            print(f"{name:<36}{f[name]:>16.2f}")


if __name__ == "__main__":
    main()
