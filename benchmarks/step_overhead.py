"""A TWA step against a plain SGD step of the same model and batch (one worker).

    python benchmarks/step_overhead.py [--setting resnet18|head_stage] [--quick | --smoke] [--threads T]
                                       [--kernel auto|eager|native|triton]

--setting resnet18 (default): CIFAR ResNet-18 (twa_ray.models, ~11.2M parameters), a batch of
64 random 32x32 images, n = 20 candidates, 4 bits, one block per tensor; target <= 1.05.
--setting head_stage: configs/head_stage.yaml's small CNN (390,890 parameters), its batch of
100 random 28x28 one-channel images, its 30 candidates, bits and granularity; target <= 1.15.
Each step is forward + backward +
update: ``optimizer.step()`` (SGD, momentum 0.9) for SGD; ``twa.step()`` (coefficient
gradient, coefficient update, reconstruction of the weights) for TWA. The two are timed
in alternation; the JSON line carries the median step times and the median of the
paired ratios, plus the median time of the TWA-only part.

--quick: 3 timed rounds (7 in the full run) and a batch of 32 (``batch`` in the JSON).
--smoke: a small CNN on 8x8 inputs, batch 16, 2 rounds, the head_stage target (for the tests).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from _common import ROOT, common_args, emit, machine, median, note, paired_ratio, set_threads, sync

import torch  # noqa: E402
from torch import nn  # noqa: E402

from twa_ray.core import TWA, flatten_params  # noqa: E402
from twa_ray.models import build_model  # noqa: E402

TARGET_RATIO = {"resnet18": 1.05, "small_cnn": 1.15}  # TWA step / SGD step, per model (issue 16)


@dataclass(frozen=True)
class Setting:
    model: str
    model_kwargs: dict
    in_channels: int
    image: int
    batch: int
    candidates: int
    bits: int
    granularity: str


def setting(name: str) -> Setting:
    if name == "resnet18":
        return Setting("resnet18", {}, 3, 32, 64, 20, 4, "tensor")
    from twa_ray.config import load_config

    cfg = load_config(ROOT / "configs" / "head_stage.yaml")
    # 30 candidates: 3 per epoch (train.save_every_steps 180 of 540 steps) over 10 epochs
    return Setting(cfg.model.name, dict(cfg.model.kwargs), 1, 28, cfg.data.batch_size, 30, cfg.twa.bits,
                   cfg.twa.granularity)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--setting", choices=("resnet18", "head_stage"), default="resnet18")
    parser.add_argument("--batch", type=int, default=None, help="default: the setting's (32 with --quick)")
    parser.add_argument("--candidates", type=int, default=None, help="default: the setting's")
    parser.add_argument("--bits", type=int, default=None, help="default: the setting's")
    parser.add_argument("--kernel", default=None,
                        help="projection kernel: auto, eager, native or triton (default: the library's, auto)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    chosen = setting(args.setting)
    if args.smoke:
        chosen = Setting("small_cnn", {}, 3, 8, 16, 20, 4, "tensor")
    model_name, channels, image = chosen.model, chosen.in_channels, chosen.image
    batch = args.batch or (32 if args.quick else chosen.batch)
    candidates_n, bits = args.candidates or chosen.candidates, args.bits or chosen.bits
    repeats = args.repeats or {"smoke": 2, "quick": 3, "full": 7}[mode]
    device = args.device

    def build() -> nn.Module:
        return build_model(model_name, 10, channels, image, **chosen.model_kwargs).to(device).train()

    torch.manual_seed(0)
    sgd_model = build()
    twa_model = build()
    twa_model.load_state_dict(sgd_model.state_dict())
    x = torch.randn(batch, channels, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    t0 = time.perf_counter()
    base = flatten_params(sgd_model)
    gen = torch.Generator(device="cpu").manual_seed(1)
    candidates = base.cpu() + 0.01 * torch.randn(candidates_n, base.numel(), generator=gen)
    twa = TWA.from_candidates(twa_model, candidates.to(device), bits=bits, granularity=chosen.granularity, lr=0.1)
    del candidates
    if args.kernel:
        twa.projection.kernel = args.kernel
    build_s = time.perf_counter() - t0
    note(f"{model_name}: D={base.numel()}, projection {twa.projection.nbytes / 1e6:.1f} MB, built in {build_s:.1f} s")
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)
    steppers = {"sgd": None, "twa": (twa_model, twa)}

    update: dict[str, list[float]] = {k: [] for k in steppers}

    def make_step(name: str):
        if name == "sgd":
            def step() -> None:
                sgd.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(sgd_model(x), y).backward()
                sgd.step()
            return step
        net, averager = steppers[name]

        def step() -> None:
            net.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            sync(device)
            t = time.perf_counter()
            averager.step()
            sync(device)
            update[name].append(time.perf_counter() - t)
        return step

    steps = {name: make_step(name) for name in steppers}

    def timed(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    for fn in steps.values():  # warm-up (allocations, lazy initialisation, compilation)
        fn()
    for v in update.values():
        v.clear()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(repeats):
        # rotate which goes first, so none always follows another's cache state
        for name in order[r % len(order):] + order[: r % len(order)]:
            times[name].append(timed(steps[name]))
    sgd_times, twa_times = times["sgd"], times["twa"]
    ratio = paired_ratio(twa_times, sgd_times)
    target = TARGET_RATIO[model_name]
    emit({
        "benchmark": "step_overhead", "mode": mode, "setting": "smoke" if args.smoke else args.setting,
        "model": model_name, "num_params": base.numel(),
        "batch": batch, "image_size": image, "candidates": candidates_n, "bits": bits,
        "granularity": chosen.granularity, "kernel": getattr(twa.projection, "kernel", "eager"), "device": device, "repeats": repeats,
        "projection_bytes": twa.projection.nbytes,
        "sgd_step_s": median(sgd_times), "twa_step_s": median(twa_times),
        "twa_update_s": median(update["twa"]),  # twa.step() alone: projection kernels, coefficient update, copies
        "ratio_twa_to_sgd": ratio, "target_ratio": target, "meets_target": ratio <= target,
        "build_s": build_s, "machine": machine(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
