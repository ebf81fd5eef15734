#!/usr/bin/env python
"""One prepared script for a short GPU session (~8 minutes on an H100).

Sections, most important first; each runs in try/except, prints its timing as
it goes, and is skipped when the time budget would be exceeded:

  1. env           device, torch, bf16 support
  2. checks        bf16 autocast gives bf16 convs/matmuls close to fp32; channels_last
                   output equals contiguous; torch.compile output equals eager
  3. bench_r50     bench_pretrain: resnet50, 256^2, batch 256, bf16 + channels_last, eager,
                   five tasks ((c) DataLoader baseline for rotation only)
  4. pretrain200   200-step pretraining of each of the five tasks from a phantom slice store
                   (resnet18, 128^2, batch 64, bf16): first/last loss, img/s
  5. bench_quick   bench_pretrain: the quick model (tiny, 64^2, batch 256), five tasks with (c)
  6. bench_r50_compiled  as 3 with torch.compile (rotation, then masked_region if time is left)

Writes $OUT/gpu_check.json (after every section, so a timeout keeps what finished)
and prints a table at the end.

    python experiments/gpu_check.py                 # on the GPU machine
    python experiments/gpu_check.py --cpu-smoke     # tiny sizes on a CPU, to test the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_pretrain  # noqa: E402

FIVE = bench_pretrain.FIVE


def section_env(ctx: dict) -> dict:
    cuda = torch.cuda.is_available()
    out = {"torch": torch.__version__, "cuda": cuda, "cpu_count": os.cpu_count()}
    if cuda:
        out.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   bf16=torch.cuda.is_bf16_supported(), memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return out


def section_checks(ctx: dict) -> dict:
    from ctssl_core.models import build_encoder

    dev = ctx["device"]
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    if dev.type == "cuda":
        a, b = torch.randn(256, 256, device=dev), torch.randn(256, 256, device=dev)
        conv = torch.nn.Conv2d(8, 16, 3, padding=1).to(dev)
        x = torch.randn(4, 8, 32, 32, device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mm, cv = a @ b, conv(x)
        ref = a @ b
        out["bf16_dtype_ok"] = mm.dtype == torch.bfloat16 and cv.dtype == torch.bfloat16
        out["bf16_rel_err"] = float((mm.float() - ref).norm() / ref.norm())
    else:
        out["bf16"] = "n/a on cpu (bf16 autocast is CUDA-only in ctssl)"
    enc = build_encoder(ctx["encoder_small"]).to(dev).eval()
    x = torch.rand(2, 1, ctx["size_small"], ctx["size_small"], device=dev)
    with torch.no_grad():
        ref = enc.embed(x)
        enc_cl = enc.to(memory_format=torch.channels_last)
        feats = enc_cl.forward_features(x.contiguous(memory_format=torch.channels_last))
        cl = feats[-1].float().mean(dim=(-2, -1))
    out["channels_last_out"] = bool(feats[0].is_contiguous(memory_format=torch.channels_last))
    out["channels_last_max_diff"] = float((cl - ref).abs().max())
    if ctx["do_compile"]:
        t0 = time.perf_counter()
        comp = torch.compile(enc.embed)
        with torch.no_grad():
            y = comp(x)
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        out["compile_max_diff"] = float((y - ref).abs().max())
    else:
        out["compile"] = "skipped (--cpu-smoke; pass --compile-on-cpu to include)"
    return out


def _bench(ctx: dict, argv: list[str]) -> dict:
    args = bench_pretrain.parse_args(argv)
    return bench_pretrain.run(args, echo=lambda s: print("   " + s, flush=True))


def section_bench_r50(ctx: dict) -> dict:
    s = ctx["sizes"]
    base = ["--encoder", s["big_encoder"], "--size", str(s["big_size"]), "--batch", str(s["big_batch"]),
            "--amp", "bf16", "--channels-last", "--warm", str(s["warm"]), "--steps", str(s["steps"]),
            "--series", str(s["series"]), "--slices", str(s["slices"])]
    res = _bench(ctx, base + ["--tasks", ",".join(t for t in FIVE if t != "rotation"), "--no-baseline"])
    res_rot = _bench(ctx, base + ["--tasks", "rotation", "--workers", str(s["workers"])])
    res["rows"] += res_rot["rows"]
    return res


def section_bench_quick(ctx: dict) -> dict:
    s = ctx["sizes"]
    return _bench(ctx, ["--encoder", "tiny", "--size", str(s["quick_size"]), "--batch", str(s["quick_batch"]),
                        "--amp", "bf16", "--channels-last", "--warm", str(s["warm"]), "--steps", str(s["steps"]),
                        "--series", str(s["series"]), "--slices", str(s["slices"]), "--workers", str(s["workers"])])


def section_bench_r50_compiled(ctx: dict) -> dict:
    s = ctx["sizes"]
    rows = []
    for task in ("rotation", "masked_region"):
        if ctx["left"]() < s["compile_need_s"]:
            rows.append({"task": task, "skipped": "time budget"})
            continue
        r = _bench(ctx, ["--encoder", s["big_encoder"], "--size", str(s["big_size"]), "--batch", str(s["big_batch"]),
                         "--amp", "bf16", "--channels-last", "--compile", "--warm", str(s["warm"] + 2),
                         "--steps", str(s["steps"]), "--series", str(s["series"]), "--slices", str(s["slices"]),
                         "--tasks", task, "--no-baseline"])
        rows += r["rows"]
    return {"rows": rows}


def section_pretrain200(ctx: dict) -> dict:
    from ctssl_core.data.loader import SliceBatcher
    from ctssl_core.models import build_encoder
    from ctssl_core.pretext import make_pretext
    from ctssl_core.train import TrainConfig, fit

    s = ctx["sizes"]
    vols, source = bench_pretrain.make_volumes(s["pt_series"], s["pt_slices"], s["pt_size"])
    rows: list[dict] = [{"data": source}]
    with tempfile.TemporaryDirectory(prefix="ctssl-gpucheck-") as tmp:
        store, _ = bench_pretrain.write_store(vols, Path(tmp))
        for name in FIVE:
            if ctx["left"]() < 20:
                rows.append({"task": name, "skipped": "time budget"})
                continue
            t0 = time.perf_counter()
            try:
                task = make_pretext(name)
                torch.manual_seed(0)
                cfg = TrainConfig(steps=s["pt_steps"], batch_size=s["pt_batch"], lr=1e-3, warmup_steps=10, amp="auto",
                                  channels_last=True, ckpt_every=0, log_every=max(s["pt_steps"] // 4, 1), device=ctx["device"].type)
                b = SliceBatcher(store, None, cfg.batch_size, context=task.context, gap=int(getattr(task, "gap", 1) or 1),
                                 device=ctx["device"], seed=0, wants_hu=bool(getattr(task, "wants_hu", False)))
                res = fit(task, build_encoder(s["pt_encoder"]), b, cfg)
                row = {"task": name, "steps": res.step, "loss_first": res.first_loss, "loss_last": res.final_loss,
                       "img_s": res.throughput, "wall_s": time.perf_counter() - t0, "amp": res.amp}
            except Exception as e:  # noqa: BLE001
                row = {"task": name, "error": f"{type(e).__name__}: {e}"}
            print(f"   pretrain {name:<14} {json.dumps(row)}", flush=True)
            rows.append(row)
    return {"rows": rows}


SECTIONS: list[tuple[str, Callable[[dict], dict], int]] = [
    # name, function, seconds it needs at least (skipped when less is left)
    ("env", section_env, 0),
    ("checks", section_checks, 10),
    ("bench_r50", section_bench_r50, 60),
    ("pretrain200", section_pretrain200, 40),
    ("bench_quick", section_bench_quick, 30),
    ("bench_r50_compiled", section_bench_r50_compiled, 60),
]


def sizes(cpu_smoke: bool) -> dict:
    if cpu_smoke:
        return dict(big_encoder="tiny", big_size=32, big_batch=8, quick_size=32, quick_batch=8, warm=1, steps=2,
                    series=2, slices=12, workers=0, pt_encoder="tiny", pt_size=32, pt_batch=8, pt_steps=20,
                    pt_series=2, pt_slices=12, compile_need_s=30)
    return dict(big_encoder="resnet50", big_size=256, big_batch=256, quick_size=64, quick_batch=256, warm=5, steps=20,
                series=8, slices=48, workers=min(8, max((os.cpu_count() or 2) - 2, 1)), pt_encoder="resnet18",
                pt_size=128, pt_batch=64, pt_steps=200, pt_series=8, pt_slices=48, compile_need_s=100)


def print_table(results: dict) -> None:
    print("\n==== summary ====")
    env = results.get("env", {}).get("result", {})
    print(f"device: {env.get('device', 'cpu')}  torch {env.get('torch')}")
    for name, sec in results.items():
        print(f"[{name}] {sec.get('status')} in {sec.get('wall_s', 0):.1f}s" + (f": {sec['error']}" if sec.get("error") else ""))
        for r in (sec.get("result") or {}).get("rows", []) if isinstance(sec.get("result"), dict) else []:
            if "b_over_a" in r:
                c = f"  (c) {r['c_img_s']:.0f} img/s  b/c {r['b_over_c']:.2f}" if "c_img_s" in r else ""
                print(f"   {r['task']:<14} (a) {r['a_img_s']:.0f} img/s  (b) {r['b_img_s']:.0f} img/s  b/a {r['b_over_a']:.2f}{c}")
            elif "loss_first" in r and "img_s" in r:
                print(f"   {r['task']:<14} loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}  {r['img_s']:.0f} img/s  {r['wall_s']:.1f}s")
            elif "error" in r or "skipped" in r:
                print(f"   {r.get('task', '?'):<14} {r.get('error') or r.get('skipped')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU session check for ctssl pretraining")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (tests the script)")
    p.add_argument("--compile-on-cpu", action="store_true", help="with --cpu-smoke: also run the torch.compile parts")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections after this many seconds")
    p.add_argument("--only", default="", help="comma-separated section names to run")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for gpu_check.json (default $OUT)")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    ctx = {
        "device": torch.device("cuda" if cuda else "cpu"),
        "sizes": sizes(args.cpu_smoke or not cuda),
        "encoder_small": "tiny",
        "size_small": 32 if args.cpu_smoke else 64,
        "do_compile": cuda or args.compile_on_cpu,
        "left": lambda: args.budget_s - (time.perf_counter() - t_start),
    }
    if not cuda:
        torch.set_num_threads(1)  # a shared small CPU: more threads only spin
    only = {s for s in args.only.split(",") if s}
    results: dict[str, dict] = {}
    out_file = Path(args.out) / "gpu_check.json" if args.out else None
    for name, fn, need in SECTIONS:
        if only and name not in only:
            continue
        if name == "bench_r50_compiled" and not ctx["do_compile"]:
            results[name] = {"status": "skipped", "error": "compile off on cpu-smoke", "wall_s": 0.0}
            continue
        if ctx["left"]() < need:
            results[name] = {"status": "skipped", "error": f"time budget ({ctx['left']():.0f}s left)", "wall_s": 0.0}
            print(f"== {name}: skipped (time budget)", flush=True)
            continue
        print(f"== {name} (t={time.perf_counter() - t_start:.0f}s)", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn(ctx)
            results[name] = {"status": "ok", "result": res}
            if name in ("env", "checks"):
                print(f"   {json.dumps(res)}", flush=True)
        except Exception as e:  # noqa: BLE001 - keep going: the next section may still work
            traceback.print_exc()
            results[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        finally:
            if ctx["device"].type == "cuda":
                torch.cuda.empty_cache()
        results[name]["wall_s"] = time.perf_counter() - t0
        print(f"   {name}: {results[name]['status']} in {results[name]['wall_s']:.1f}s", flush=True)
        if out_file is not None:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0 if all(r["status"] != "error" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
