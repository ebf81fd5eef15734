"""``ctssl synth``: write the synthetic chest-CT cohort (DICOM + RSNA-PE csv + LIDC XML + demographics)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ctssl_core.cli import add_progress_option, add_set_option

SECTION = "synth"  # the profile section this command reads (`--set KEY=...` means synth.KEY)
HELP = "Generate the synthetic chest-CT cohort as DICOM with RSNA-PE labels, LIDC reads and demographics."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="output folder (default: data/cohorts/synthetic)")
    p.add_argument("--preset", choices=["tiny", "default"], default="default",
                   help="tiny: 8 exams x 16 slices x 64^2 (seconds); default: 100 x 48 x 256^2")
    p.add_argument("--profile", default=None, help="take the `synth` section of a profile (smoke/quick/paper or a YAML path)")
    add_set_option(p, SECTION, "synth.n_patients=20 --set synth.race_effect=0")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if an identical complete cohort is already there")
    add_progress_option(p)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ctssl_core.config import build, load_profile, merge, section_overrides
    from ctssl_core.data.synth import PRESETS, SYNTHETIC_NOTICE, SynthConfig, generate_cohort
    from ctssl_core.paths import default_cohort

    base = dataclasses.asdict(PRESETS[args.preset])
    if args.profile:
        base = merge(base, load_profile(args.profile).get("synth", {}) or {})
    cfg = build(SynthConfig, base, section_overrides(args.overrides, "synth", SECTION), where="synth.")
    out = args.out or default_cohort()
    m = generate_cohort(cfg, out, progress=not args.no_progress, overwrite=args.overwrite)
    state = "reused the complete cohort already in" if m.reused else "wrote"
    print(f"ctssl synth: {state} {out}")
    print(f"  patients {m.n_patients}, slices {m.n_slices}, PE-positive exams {m.n_pe_exams}, "
          f"exams with nodules {m.n_nodule_exams}, {m.seconds:.1f} s to generate"
          f"{' (earlier run)' if m.reused else f' with {cfg.workers} worker(s)'} ({m.cpu_seconds:.1f} CPU-s of rendering)")
    print(f"  {SYNTHETIC_NOTICE}")
    return 0


def interrupted_hint(args, exc) -> str:
    return "a partial cohort is not reused; re-run the same command to write it again."
