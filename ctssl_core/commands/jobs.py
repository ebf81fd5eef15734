"""`ctssl jobs submit|list|show|cancel|resume|logs`: the Jobs page from a terminal (same functions)."""

from __future__ import annotations

import argparse

from ctssl_core.cli import add_json_option, add_set_option

HELP = "Queue, list, cancel and resume background jobs (pretrain, finetune, probe, embed, benchmark)."


def add_arguments(p) -> None:
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("submit", help="validate and queue a job: "
                                      "`ctssl jobs submit finetune --set task=pe --set finetune.fraction=0.05`")
    s.add_argument("kind", help="job kind (see `ctssl jobs kinds`)")
    add_set_option(s, "KIND", "finetune.init=masked_region --set seed=1 (the fields `ctssl jobs kinds` lists)")
    s.add_argument("params", nargs="*", metavar="key=value",
                   help="deprecated spelling of --set KEY=VALUE (still accepted, with a note)")
    s.add_argument("--no-worker", action="store_true", help="only queue; do not start a worker if none runs")
    s.add_argument("--max-cpu-jobs", type=int, default=1, help="for a worker started here (default 1)")
    k = sub.add_parser("kinds", help="list job kinds, their fields, defaults and allowed values")
    add_json_option(k)
    ls = sub.add_parser("list", help="jobs, newest first")
    ls.add_argument("--state", action="append", default=None, help="only this state (repeatable)")
    ls.add_argument("--limit", type=int, default=50)
    add_json_option(ls)
    sh = sub.add_parser("show", help="one job's full record")
    sh.add_argument("job_id")
    c = sub.add_parser("cancel", help="SIGTERM the job's process group (SIGKILL after the worker's --grace, "
                                      "recorded with the job)")
    c.add_argument("job_id")
    c.add_argument("--no-wait", action="store_true", help="return at once instead of waiting for the end")
    r = sub.add_parser("resume", help="queue a failed/cancelled job again from its last checkpoint")
    r.add_argument("job_id")
    lg = sub.add_parser("logs", help="tail of the job's log")
    lg.add_argument("job_id")
    lg.add_argument("-n", "--lines", type=int, default=40)
    sub.add_parser("reconcile", help="mark jobs whose process died as failed (the worker does this too)")
    for action in sub.choices.values():  # `--store` also after the action: `ctssl jobs list --store S`
        action.add_argument("--store", default=argparse.SUPPRESS, help="store folder")


def _fmt_job_row(r) -> str:
    prog = "" if r.progress is None or r.progress != r.progress else f"{100 * r.progress:5.1f}%"
    cur = r.current or {}
    loss = next((f"{k}={v:.4g}" for k, v in cur.items() if "loss" in k and isinstance(v, (int, float))), "")
    return f"{r.job_id:32} {r.kind:10} {r.state:10} {prog:>6} {loss:24} {r.run_id or ''}"


def _kinds_json(store) -> dict:
    """``jobs kinds`` as data: kind -> label and fields (default, bounds, allowed values in this store)."""
    import dataclasses

    from ctssl_core import jobs

    out = {}
    for name, jk in jobs.job_kinds().items():
        choices = jobs.field_choices(name, store)
        out[name] = {"label": jk.label, "fields": [
            {"name": f.name, "default": f.default, "min": f.metadata.get("min"), "max": f.metadata.get("max"),
             "min_exclusive": bool(f.metadata.get("min_open")), "choices": choices.get(f.name)}
            for f in dataclasses.fields(jk.spec)]}
    return out


def run(args) -> int:
    import dataclasses
    import json
    import sys

    from ctssl_core import jobs
    from ctssl_core.config import parse_overrides, spec_overrides
    from ctssl_core.paths import default_store

    store = jobs.absolute_store(args.store or default_store())  # once, against the caller's folder
    if args.action == "submit":
        if args.params:
            print(f"note: positional key=value is deprecated; write --set {' --set '.join(args.params)}",
                  file=sys.stderr)
        params = parse_overrides(spec_overrides([*args.params, *args.overrides], "jobs submit", args.kind))
        job_id = jobs.submit(store, args.kind, params)
        print(job_id)
        if not args.no_worker:
            pid = jobs.ensure_worker(store, max_cpu_jobs=args.max_cpu_jobs)
            print(f"started worker pid {pid}" if pid else "a worker is already running", flush=True)
        return 0
    if args.action == "kinds" and args.json:
        print(json.dumps(_kinds_json(store), indent=2, default=str))
        return 0
    if args.action == "kinds":
        for name, jk in jobs.job_kinds().items():
            print(f"{name}: {jk.label}")
            choices = jobs.field_choices(name, store)
            for f in dataclasses.fields(jk.spec):
                m = f.metadata
                lim = ([f"min{'>' if m.get('min_open') else '='}{m['min']}"] if m.get("min") is not None else []) + \
                      ([f"max={m['max']}"] if m.get("max") is not None else [])
                ch = f" one of {choices[f.name][:8]}" if f.name in choices else ""
                print(f"    {f.name} (default {f.default!r}){' ' + ' '.join(lim) if lim else ''}{ch}")
        return 0
    if args.action == "list":
        df = jobs.list_jobs(store, limit=args.limit, states=tuple(args.state) if args.state else None)
        if args.json:  # one array of job records (spec/current as objects, NaN as null, times as ISO text)
            records = json.loads(df.to_json(orient="records", date_format="iso", default_handler=str))
            print(json.dumps(records, indent=2))
            return 0
        if df.empty:
            print("no jobs")
            return 0
        df = df.astype(object).where(df.notna(), None)
        for r in df.itertuples(index=False):
            print(_fmt_job_row(r))
        return 0
    if args.action == "show":
        print(json.dumps(jobs.get_job(store, args.job_id), default=str, indent=2))
        return 0
    if args.action == "cancel":
        state = jobs.cancel(store, args.job_id, wait=not args.no_wait)
        print(f"{args.job_id}: {state if not args.no_wait else 'cancel requested'}")
        return 0
    if args.action == "resume":
        new_id = jobs.resume(store, args.job_id)
        note = (jobs.get_job(store, new_id, live=False)["spec"] or {}).get("note")
        if note:
            print(f"note: {note}", file=sys.stderr)
        print(new_id)
        return 0
    if args.action == "logs":
        jobs.get_job(store, args.job_id)  # clear message for an unknown id
        print(jobs.log_tail(store, args.job_id, n_lines=args.lines))
        return 0
    if args.action == "reconcile":
        for job_id, reason in jobs.reconcile(store):
            print(f"{job_id}: failed: {reason}")
        return 0
    return 2
