"""bench_core.py's tables on a GPU: the decomposed forward vs one plain forward, TL patching of
every head, and zero-ablating each neuron, timed on `--device` (wall time after
`torch.cuda.synchronize()`, the minimum over interleaved rounds).

    python benchmarks/gpu.py                           # --device cuda
    python benchmarks/gpu.py --n 128 --layers 12 --d-model 768 --d-vocab 50257   # GPT-2-small shape
    python benchmarks/gpu.py --device cpu --n 8 --rounds 1   # smoke check without a GPU
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_core  # noqa: E402


def main() -> None:
    args = bench_core.parser("cuda").parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu for a smoke check")
    bench_core.main(args.device)
    if args.device.startswith("cuda"):
        print(f"\n{torch.cuda.get_device_name()}, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
