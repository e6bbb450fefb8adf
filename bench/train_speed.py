"""Training speed of EfficientNet-Lite0 at 224 px on this machine, against its peak.

    .venv/bin/python bench/train_speed.py [--seconds 20] [--batch 32] [--device cuda]

Measures, on random inputs (compute only; data loading is measured by import_speed.py):
  * frozen stage, one epoch's worth of work per image:
      - without a cache: backbone forward (no grad) + head step, every epoch
      - with tagmill's feature cache: head step on cached features (the backbone ran once)
      - building the cache: one backbone forward per image and view (paid once)
  * unfrozen stage: forward + backward + AdamW step, fp32 vs bf16 autocast, channels-last.
Each row shows images/s, the FLOP/s that implies (FLOPs counted by torch's
FlopCounterMode; a training step ~= 3x the forward FLOPs) and the ratio to the
machine's measured matmul peak (fp32 or bf16). On a GPU (``--device cuda``) the peak is
measured in the same run (a large matmul in each precision), every timing waits for the
GPU, and the unfrozen rows are also taken at a GPU-sized batch (``--gpu-batch``).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tagmill.models import create_classifier, forward_features_pooled, head
from tagmill.train.device import inference_chunk, run_chunked

#: Peak matmul throughput measured on the 2-core development machine (bench/README.md, train_speed.py).
PEAK_GFLOPS = {"fp32": 100.0, "bf16": 300.0}


def forward_flops(model: torch.nn.Module, size: int) -> float:
    x = torch.randn(1, 3, size, size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    """GPU work is queued: a timing is only true once the queue has drained."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step, batch: int, seconds: float, device: torch.device = torch.device("cpu")) -> float:
    for _ in range(3 if device.type == "cuda" else 1):  # warm-up (cuDNN picks its kernels on the first calls)
        step()
    sync(device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += batch
    sync(device)
    return done / (time.perf_counter() - start)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """GFLOP/s of an 8192-square matmul on the GPU: the ceiling the rows are compared with."""
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return rate(lambda: a @ b, 1, seconds, device) * 2 * n**3 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="time per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--gpu-batch", type=int, default=256, help="on a GPU, the unfrozen rows also at this batch")
    args = parser.parse_args()
    size, batch, device = args.size, args.batch, torch.device(args.device)
    model = create_classifier("efficientnet_lite0", 10).to(device, memory_format=torch.channels_last)
    classifier = head(model)
    fwd = forward_flops(model, size)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (batch,), device=device)
    features = torch.randn(batch, classifier.in_features, device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    head_opt = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
    chunk = inference_chunk(device, size)
    peak = dict(PEAK_GFLOPS)
    if device.type == "cuda":
        peak = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
        print(f"{torch.cuda.get_device_name(device)}: matmul peak measured {peak['fp32']:,.0f} GFLOP/s fp32 "
              f"(TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}), {peak['bf16']:,.0f} bf16", flush=True)

    def head_step(feats: torch.Tensor) -> None:
        loss = loss_fn(classifier(feats), targets)
        head_opt.zero_grad()
        loss.backward()
        head_opt.step()

    def uncached_frozen_step() -> None:
        model.eval()
        with torch.no_grad():
            feats = run_chunked(lambda x: forward_features_pooled(model, x), images, chunk)
        head_step(feats)

    def cache_step() -> None:
        model.eval()
        with torch.inference_mode():
            run_chunked(lambda x: forward_features_pooled(model, x), images, chunk)

    rows = []  # (what, images/s, flops per image, precision)
    print(f"Lite0 at {size} px: {fwd / 1e9:.2f} GFLOPs per forward; batch {batch}; {torch.get_num_threads()} threads; "
          f"device {device}", flush=True)
    rows.append(("frozen epoch, no cache (forward + head)", rate(uncached_frozen_step, batch, args.seconds, device), fwd, "fp32"))
    rows.append(("frozen epoch, cached features (head only)", rate(lambda: head_step(features), batch, args.seconds / 4, device), 0.0, "fp32"))
    rows.append(("building the cache (forward once per view)", rate(cache_step, batch, args.seconds, device), fwd, "fp32"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [batch] + ([args.gpu_batch] if device.type == "cuda" and args.gpu_batch != batch else [])
    for size_of_batch in batches:
        x = torch.randn(size_of_batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (size_of_batch,), device=device)
        for precision in ("fp32", "bf16"):
            def train_step(x=x, y=y, precision=precision) -> None:
                model.train()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            label = f"unfrozen step, {precision}" + (f", batch {size_of_batch}" if len(batches) > 1 else "")
            rows.append((label, rate(train_step, size_of_batch, args.seconds, device), 3 * fwd, precision))

    print(f"\n| {'stage':<44} | {'images/s':>9} | {'GFLOP/s':>8} | {'of peak':>7} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 10}|{'-' * 9}|")
    for what, images_per_s, flops, precision in rows:
        gflops = images_per_s * flops / 1e9
        share = f"{gflops / peak[precision]:6.0%}" if flops else "     -"
        print(f"| {what:<44} | {images_per_s:9.1f} | {gflops:8.1f} | {share:>7} |")
    no_cache, cached = rows[0][1], rows[1][1]
    print(f"\nfeature cache: a frozen epoch runs {cached / no_cache:,.0f}x faster once the cache is built")


if __name__ == "__main__":
    main()
