"""Collective traffic per TWA step with k = 2 workers, against one all-reduce of D floats.

    python benchmarks/comm.py [--quick | --smoke] [--model NAME] [--workers K] [--sharding blocks|fsdp|both]
                              [--grad-clip C]

Both TWA modes (``twa.sharding``; ``--sharding``, default both), each JSON line with its
``sharding``.

blocks: two gloo processes on 127.0.0.1 (torch.multiprocessing; no Ray) run sharded TWA as the
runtime builds it (``BlocksMode``, over the library's ``sharded`` exchange), every collective
counted by wrapping ``torch.distributed``'s functions (``_dist.DistCounter``), and then the paper's
scheme on the same candidates (rows of Q sharded; a data-parallel gradient all-reduce
of D floats plus an all-reduce of the full parameter vector, implemented here as the
reference). Both reach the same weights: after the first step they agree to float
rounding (``first_step_weight_diff`` next to the step's largest change); after more
steps the rounding differences grow with the training dynamics (``max_weight_diff``).

Traffic is counted two ways, per step and worker:
- payload: bytes handed to the collectives (an exchange's ``bytes_sent``); one
  all-reduce of D float32 values is 4*D bytes of payload;
- wire: bytes each worker sends with ring algorithms (reduce-scatter and all-gather of an
  N-byte vector send (k-1)/k*N, an all-reduce 2(k-1)/k*N); one all-reduce of D floats
  is 2(k-1)/k*4*D bytes.
Target: traffic <= 1.05 x one all-reduce of D. The planner's prediction
(``twa_ray.planner``) is printed next to the measurement.

fsdp: the same model and candidates (in a candidate store) under ``twa.sharding: fsdp`` as the
runtime builds it (``FSDPMode``: ``fsdp_wrap``, ``build_fsdp_twa``); FSDP2 issues its collectives
itself, counted the same way: per FSDP unit an all-gather of its padded shards in the forward pass
and again in the backward pass (FSDP2 reshards every unit but the root after forward) and a
reduce-scatter of its gradient, then TWA's all-reduce of the n x L coefficient gradient (+ 8
bytes for the gradient norm with --grad-clip). Predicted from the planner's FSDP2 plan
(``planner.plan_fsdp``: the padded shards, ``fsdp_units``) by ``planner.planned_fsdp_traffic``;
``matches_plan`` says whether the count equals it (bytes and calls).

Default model: CIFAR ResNet-18, n = 20, 4 bits, one block per tensor, global batch 16,
3 timed steps (--quick: 1). --smoke: small CNN on 8x8 inputs, n = 4. --grad-clip: TWA clips
the gradient norm in both modes (and the paper's scheme in blocks, so the weights still agree).

    python benchmarks/comm.py --time [--quick | --smoke] [--model NAME] [--backend gloo|nccl] [--rounds R]
                                     [--sharding blocks|fsdp|both]

--time measures time instead of bytes: k processes (``_dist.time_collectives``) call, with
blocks, the collectives of one TWA step through the library's exchanges (``parallel.exchanges``; reduce-scatter of
the gradient, all-reduce of the n x L coefficient gradient, all-gather of the weights, with
the shapes of the model's shard plan) and, in the same interleaved rounds on the same
backend, one all-reduce of D floats and the alternatives:
- ``twa_step_ar_slice``: an all-reduce of D plus a local slice in place of the reduce-scatter;
- ``twa_step_all_reduce_only``: also the all-gather as an all-reduce of a zeroed D-vector
  that holds this rank's slice (``all_gather_via_all_reduce`` alone): the step as the library
  makes it with ``twa.exchange: all_reduce`` (``twa_step``: ``sharded``);
- ``twa_step_ring``: the step with ``twa.exchange: ring``, the default on gloo: reduce-scatter and
  all-gather as rings of point-to-point sends (``reduce_scatter_ring``, ``all_gather_ring`` alone);
- with k = 2, overlap: ``forward_backward`` (the model's pass on a rank's share of a global batch of
  64; 8 with --smoke) alone and ``forward_backward_under_all_gather_ring`` with the ring all-gather
  in flight during it. Its line has ``exposed_all_gather_s`` (what the all-gather added to the pass)
  and ``hidden_fraction`` (1 - that / the all-gather alone, per round): the most overlapping the
  all-gather with the next forward pass can hide;
- ``all_reduce_D_buckets_<MB>MB_{sync,async}``: the all-reduce of D as buckets of that
  size, one after the other or all in flight at once (as DistributedDataParallel issues them);
- each of the step's three collectives alone.
Before timing, each rank checks that the alternatives give the library's results
(``alternatives_match``). A call's time is the slowest rank's, after a barrier; per variant the JSON line has the
median over rounds and ``ratio_to_all_reduce_D``, the median of the per-round ratios.
With fsdp, in the same rounds (``_dist.FSDP_TIMED_VARIANTS``): ``fsdp_step``, the collectives
FSDP2 and TWA make in one fsdp-mode step (per unit all-gathers in forward and backward,
reduce-scatters, the n x L all-reduce; the model's units and padded shards), with
``ratio_to_twa_step`` against the blocks step; ``fsdp_step_flat`` (the same bytes with the
model as one unit); its all-gathers and reduce-scatters alone.
Target: ``twa_step`` (and ``fsdp_step``) <= 1.1 x one all-reduce of D. Rounds: 20 (--quick 3;
--smoke: small CNN, 2). NCCL needs one GPU per rank. Each line's ``sharding`` is the mode of its
variant (null for the all-reduces of D and of the coefficient gradient, which both share).
"""
from __future__ import annotations

import argparse

from _common import common_args, emit, machine, median, note, paired_ratio, utc_date
from _dist import (
    FSDP_TIMED_VARIANTS, SHARDINGS, TIMED_VARIANTS, CollectiveTiming, Setting, bucket_variant, run_workers,
    setting_dict, slowest_rank_times, time_collectives, variant_sharding,
)

from twa_ray.parallel.exchanges import resolve_exchange  # noqa: E402
from twa_ray.planner import plan_capacity, plan_fsdp, planned_fsdp_traffic, wire_factor  # noqa: E402

TARGET_RATIO = 1.05
TARGET_TIME_RATIO = 1.1  # collective time of a TWA step / one all-reduce of D


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--model", default=None, help="default resnet18 (small_cnn with --smoke)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=None)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--granularity", default="tensor")
    parser.add_argument("--time", action="store_true", help="time the collectives instead of counting bytes")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="--time: the process group")
    parser.add_argument("--rounds", type=int, default=None, help="--time: timed rounds")
    parser.add_argument("--sharding", default="both", choices=[*SHARDINGS, "both"],
                        help="the TWA mode(s) (twa.sharding)")
    parser.add_argument("--grad-clip", type=float, default=None, help="TWA clips the gradient norm to this value")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.time:
        return time_main(args, mode)
    setting = Setting(
        model=args.model or ("small_cnn" if args.smoke else "resnet18"),
        image_size=8 if args.smoke else 32,
        candidates=args.candidates or (4 if args.smoke else 20),
        bits=args.bits, granularity=args.granularity,
        global_batch=8 if args.smoke else 16,
        steps={"smoke": 1, "quick": 1, "full": 3}[mode],
        threads=args.threads or 1, reference=True, grad_clip=args.grad_clip,
    )
    for sharding in SHARDINGS if args.sharding == "both" else [args.sharding]:
        note(f"comm: {sharding}, {setting.model}, k={args.workers}, n={setting.candidates}, {setting.bits} bits ...")
        records = (count_blocks if sharding == "blocks" else count_fsdp)(setting, args.workers, mode)
        for record in records:
            emit(record)
        note(count_table(records))
    return 0


def count_blocks(setting: Setting, k: int, mode: str) -> list[dict]:
    """The blocks mode's traffic per step, one record per rank, with the paper's scheme's."""
    results = run_workers(setting, k)
    d = results[0]["num_params"]
    one_payload = 4 * d
    one_wire = wire_factor("all_reduce", k) * one_payload
    from twa_ray.core.params import ParamLayout  # noqa: E402

    numels = ParamLayout.from_model(setting.build()).numels
    planned = plan_capacity(numels, setting.candidates, setting.bits, k, setting.granularity,
                            grad_clip=setting.grad_clip is not None)
    out = []
    for r in results:
        ours_payload, ours_wire = r["payload_per_step"], r["wire_per_step"]
        ref_payload, ref_wire = r["reference_payload_per_step"], r["reference_wire_per_step"]
        out.append({
            "benchmark": "comm", "sharding": "blocks", "mode": mode, "rank": r["rank"], "workers": k,
            "setting": setting_dict(setting),
            "num_params": d, "num_blocks": r["num_blocks"], "coords": r["coords"], "padded_length": r["padded_length"],
            "one_all_reduce_payload_bytes": one_payload, "one_all_reduce_wire_bytes": one_wire,
            "payload_bytes_per_step": ours_payload, "payload_by_op": r["payload_by_op_per_step"],
            "payload_ratio": ours_payload / one_payload,
            "wire_bytes_per_step": ours_wire, "wire_ratio": ours_wire / one_wire,
            "paper_payload_bytes_per_step": ref_payload, "paper_payload_ratio": ref_payload / one_payload,
            "paper_wire_bytes_per_step": ref_wire, "paper_wire_ratio": ref_wire / one_wire,
            "target_ratio": TARGET_RATIO,
            "meets_target_payload": ours_payload / one_payload <= TARGET_RATIO,
            "meets_target_wire": ours_wire / one_wire <= TARGET_RATIO,
            "planned_payload_bytes_per_step": planned.payload["total"],
            "planned_wire_bytes_per_step": planned.wire["total"],
            "step_s": r["step_s"], "paper_step_s": r["reference_step_s"],
            # the two schemes do the same arithmetic in another order: equal weights after a step,
            # then float differences grow with the training dynamics
            "first_step_weight_diff": r["first_step_weight_diff"],
            "first_step_weight_change": r["first_step_weight_change"],
            "max_weight_diff": r["max_weight_diff"], "max_weight_change": r["max_weight_change"],
            "machine": machine(),
        })
    return out


def count_fsdp(setting: Setting, k: int, mode: str) -> list[dict]:
    """The fsdp mode's traffic per step, one record per rank, against the planner's."""
    from twa_ray.core.params import ParamLayout  # noqa: E402

    results = run_workers(setting, k, "fsdp")
    layout = ParamLayout.from_model(setting.build())
    d = layout.num_params
    one_payload, one_wire = 4 * d, wire_factor("all_reduce", k) * 4 * d
    planned = planned_fsdp_traffic(layout.names, layout.shapes, setting.candidates, setting.bits, k,
                                   setting.granularity, setting.grad_clip is not None)
    memory = plan_fsdp(layout.names, layout.shapes, setting.candidates, setting.bits, k, setting.granularity)
    out = []
    for r in results:
        payload, wire = r["payload_per_step"], r["wire_per_step"]
        out.append({
            "benchmark": "comm", "sharding": "fsdp", "mode": mode, "rank": r["rank"], "workers": k,
            "setting": setting_dict(setting), "num_params": d, "num_blocks": r["num_blocks"], "coords": r["coords"],
            "padded_coords": r["padded_coords"], "fsdp_units": planned["units"],
            "one_all_reduce_payload_bytes": one_payload, "one_all_reduce_wire_bytes": one_wire,
            "payload_bytes_per_step": payload, "payload_by_op": r["payload_by_op_per_step"],
            "calls_per_step": r["calls_per_step"], "payload_ratio": payload / one_payload,
            "wire_bytes_per_step": wire, "wire_ratio": wire / one_wire,
            "twa_payload_bytes_per_step": r["twa_payload_per_step"],  # TWA's own collectives: the n x L all-reduce
            "target_ratio": TARGET_RATIO, "meets_target_payload": payload / one_payload <= TARGET_RATIO,
            "meets_target_wire": wire / one_wire <= TARGET_RATIO,
            "planned_payload_bytes_per_step": planned["payload"], "planned_wire_bytes_per_step": planned["wire"],
            "planned_payload_by_op": planned["by_op"], "planned_calls_per_step": planned["calls"],
            "matches_plan": (r["payload_by_op_per_step"] == planned["by_op"]
                             and r["calls_per_step"] == planned["calls"]
                             and r["padded_coords"] == planned["padded_coords"]),
            "projection_bytes": r["projection_bytes"], "planned_projection_bytes": memory.projection_bytes[r["rank"]],
            "param_bytes": r["param_bytes"], "step_s": r["step_s"], "twa_update_s": r["twa_update_s"],
            "machine": machine(),
        })
    return out


def count_table(records: list[dict]) -> str:
    """Rank 0's counted traffic per step beside the planner's, as text."""
    r = records[0]
    mb = 1e6
    return (f"{r['sharding']}: payload {r['payload_bytes_per_step'] / mb:.2f} MB ({r['payload_ratio']:.3f} x 4D), "
            f"planned {r['planned_payload_bytes_per_step'] / mb:.2f} MB; wire {r['wire_bytes_per_step'] / mb:.2f} MB "
            f"({r['wire_ratio']:.3f} x one all-reduce of D), planned {r['planned_wire_bytes_per_step'] / mb:.2f} MB")


def payload_bytes(variant: str, d: int, pad: int, k: int, coef_numel: int, min_coords: int) -> int:
    """Bytes one rank hands to the collectives of ``variant`` (float32; a blocks variant or a reference).
    The ring's sends differ by rank: this is the most, that of a rank next to the smallest range
    (``min_coords``): each ring collective sends every range but one."""
    ar_coef, ar_d = 4 * coef_numel, 4 * d
    if variant.startswith("all_reduce_D"):
        return ar_d
    if variant == "all_reduce_coef":
        return ar_coef
    rs, ag, ring = 4 * k * pad, 4 * pad, 4 * (d - min_coords)
    return {"twa_step": rs + ar_coef + ag, "twa_step_ar_slice": ar_d + ar_coef + ag,
            "twa_step_all_reduce_only": 2 * ar_d + ar_coef, "twa_step_ring": 2 * ring + ar_coef,
            "reduce_scatter": rs, "all_gather": ag, "reduce_scatter_ring": ring, "all_gather_ring": ring,
            "all_gather_via_all_reduce": ar_d, "forward_backward": 0,
            "forward_backward_under_all_gather_ring": ring}[variant]


def fsdp_payload_bytes(variant: str, padded: int, root_padded: int, k: int, coef_numel: int) -> int:
    """Bytes one rank hands to the collectives of fsdp ``variant`` (float32): ``padded`` = P, the
    padded shard of all units, ``root_padded`` the root unit's part (gathered once)."""
    ag, ag_flat, rs, ar_coef = 4 * (2 * padded - root_padded), 4 * padded, 4 * k * padded, 4 * coef_numel
    return {"fsdp_step": ag + rs + ar_coef, "fsdp_step_flat": ag_flat + rs + ar_coef, "fsdp_all_gathers": ag,
            "fsdp_reduce_scatters": rs}[variant]


# the blocks step's timed variants, by the twa.exchange whose collectives each one makes
STEP_EXCHANGES = {"twa_step": "sharded", "twa_step_all_reduce_only": "all_reduce", "twa_step_ring": "ring"}


def time_records(timing: CollectiveTiming, results: list[dict], mode: str) -> list[dict]:
    """One record per timed variant from the ranks' results (``_dist.time_collectives``)."""
    times = slowest_rank_times(results)
    ref = times["all_reduce_D"]
    first = results[0]
    k, d, pad = first["world_size"], first["num_params"], first["padded_length"]
    coef_numel = timing.candidates * first["num_blocks"]
    info, date = machine(), utc_date()
    descriptions = {**TIMED_VARIANTS, **FSDP_TIMED_VARIANTS}
    for mb in timing.bucket_mb:
        for asynchronous in (False, True):
            descriptions[bucket_variant(mb, asynchronous)] = (
                f"the all-reduce of D as {first['buckets'][f'{mb:g}']} buckets of <= {mb:g} MB, "
                + ("all in flight at once" if asynchronous else "one after the other"))
    out = []
    for variant, t in times.items():
        sharding = variant_sharding(variant)
        record = {
            "benchmark": "comm", "measure": "time", "sharding": sharding, "mode": mode, "backend": timing.backend,
            "workers": k, "model": timing.model, "num_params": d, "num_blocks": first["num_blocks"],
            "candidates": timing.candidates, "bits": timing.bits, "padded_length": pad, "variant": variant,
            "description": descriptions[variant],
            # blocks: its alternatives give the library's results (None: blocks not timed)
            "alternatives_match": (None if first["alternatives_match"] is None
                                   else all(r["alternatives_match"] for r in results)),
            "payload_bytes": (
                fsdp_payload_bytes(variant, first["fsdp_padded"], first["fsdp_root_padded"], k, coef_numel)
                if sharding == "fsdp" else payload_bytes(variant, d, pad, k, coef_numel,
                                                         min(r["coords"] for r in results))),
            "median_s": median(t), "min_s": min(t), "rounds": len(t),
            "ratio_to_all_reduce_D": paired_ratio(t, ref),
        }
        if variant in STEP_EXCHANGES:  # the blocks step as each twa.exchange makes it
            record.update(exchange=STEP_EXCHANGES[variant],
                          default_exchange=resolve_exchange("auto", timing.backend) == STEP_EXCHANGES[variant])
        if variant in (*STEP_EXCHANGES, "fsdp_step"):
            record.update(target_ratio=TARGET_TIME_RATIO,
                          meets_target=record["ratio_to_all_reduce_D"] <= TARGET_TIME_RATIO)
        if variant == "twa_step":
            record["ratio_to_ar_slice_step"] = paired_ratio(t, times["twa_step_ar_slice"])
        if variant == "forward_backward_under_all_gather_ring":
            # per round, what the all-gather added to the pass, and the share of it the pass hid
            exposed = [u - f for u, f in zip(t, times["forward_backward"])]
            record.update(exposed_all_gather_s=median(exposed), all_gather_ring_s=median(times["all_gather_ring"]),
                          hidden_fraction=median([1 - e / a for e, a in zip(exposed, times["all_gather_ring"])]))
        if variant == "fsdp_step":
            record.update(fsdp_units=first["fsdp_units"], padded_coords=first["fsdp_padded"])
            if "twa_step" in times:  # the two modes' step collectives, timed in the same rounds
                record["ratio_to_twa_step"] = paired_ratio(t, times["twa_step"])
        record.update(date=date, machine=info)
        out.append(record)
    return out


def time_table(records: list[dict]) -> str:
    """The records as an aligned text table (ms and ratio to one all-reduce of D)."""
    r0 = records[0]
    lines = [f"collectives on {r0['backend']}, {r0['workers']} ranks, {r0['model']} (D = {r0['num_params']:,}), "
             f"n = {r0['candidates']}, {r0['bits']} bits: median of {r0['rounds']} rounds (slowest rank)",
             f"{'variant':<36} {'ms':>9} {'x all-reduce(D)':>16}"]
    for r in records:
        lines.append(f"{r['variant']:<36} {1e3 * r['median_s']:>9.2f} {r['ratio_to_all_reduce_D']:>16.3f}")
    for r in (r for r in records if "hidden_fraction" in r):
        lines.append(f"overlap: the ring all-gather ({1e3 * r['all_gather_ring_s']:.2f} ms alone) added "
                     f"{1e3 * r['exposed_all_gather_s']:.2f} ms to a forward and backward pass in flight: "
                     f"{100 * r['hidden_fraction']:.0f} % hidden")
    for step in (r for r in records if "target_ratio" in r):
        how = f" (twa.exchange: {step['exchange']}{', the default here' if step['default_exchange'] else ''})" \
            if "exchange" in step else ""
        lines.append(f"target: {step['variant']}{how} <= {step['target_ratio']} x all-reduce(D): "
                     f"{'met' if step['meets_target'] else 'not met'} ({step['ratio_to_all_reduce_D']:.3f})")
    return "\n".join(lines)


def time_main(args, mode: str) -> int:
    smoke = mode == "smoke"
    timing = CollectiveTiming(
        model=args.model or ("small_cnn" if smoke else "resnet18"),
        image_size=8 if smoke else 32,
        candidates=args.candidates or (4 if smoke else 20),
        bits=args.bits, granularity=args.granularity,
        rounds=args.rounds or {"smoke": 2, "quick": 3, "full": 20}[mode],
        warmup_rounds=1 if smoke else 2,
        bucket_mb=(0.01, 0.04) if smoke else (1.0, 4.0, 25.0),  # smoke: a few buckets of a tiny model
        backend=args.backend, threads=args.threads or 1, sharding=args.sharding,
        global_batch=8 if smoke else 64,  # as sharding_speed's ResNet-18 step
    )
    note(f"comm --time: {timing.model}, k={args.workers}, {timing.backend}, {timing.rounds} rounds ...")
    records = time_records(timing, time_collectives(timing, args.workers), mode)
    for r in records:
        emit(r)
    note(time_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
