"""BENCHMARKS.md rows from what tools/gpu_suite.sh left in its directory, with every GPU target checked.

    python tools/gpu_suite_report.py gpu_suite_out              # prints, writes gpu_suite_out/benchmark_rows.md
    python tools/gpu_suite_report.py gpu_suite_out --append BENCHMARKS.md       # and appends the rows there

It reads whatever the stages produced; a stage that did not run, failed or timed out is named as such, never
filled in. Inputs (all optional): status/<name>.json (each stage's outcome, seconds and machine), env.json (the
machine, for stages whose status does not name it), tests.txt, profile_step.json, profile_pipeline.json,
smoke_run/metrics.jsonl and modes_<eager|compile|graph>/metrics.jsonl. The directory may gather the archives of
several gpu_suite.sh calls (unpacked into it one after the other).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/gpu_suite_report.py`: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.plot_metrics import RunMetrics, read_metrics  # noqa: E402

# issue 5 and 4: per H100, 64 images per GPU, 2x224 + 6x96
TARGET_GRAPH_SAMPLES_PER_S = 1800
TARGET_SPEEDUP_OVER_OFFICIAL = 2.0
TARGET_SINKHORN_MS = 0.1
TARGET_PIPELINE_SAMPLES_PER_S = 3000
MODES = ("eager", "compile", "graph")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> RunMetrics:
    """A train.py metrics.jsonl (plot_metrics' reader: lines cut by a kill skipped); empty when missing or blank."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cut last line: the report states what ran, not how it ended
            return read_metrics(path)
    except (FileNotFoundError, ValueError):
        return RunMetrics()


def _status(suite: Path, name: str) -> str:
    st = _json(suite / "status" / f"{name}.json")
    if st is None:
        return "not run"
    return st["status"] + (f", {st['seconds']} s" if "seconds" in st else "")


def _machines(suite: Path, stages: tuple[str, ...]) -> dict[tuple[str, str], list[str]]:
    """{(device, software stack): the stages that ran there}, from each stage's status (gpu_suite.sh records the
    call's env.json in it: calls of the device tool usually start fresh machines, maybe of another kind); stages
    without one (older suites) take the directory's env.json."""
    default = _json(suite / "env.json")
    machines: dict[tuple[str, str], list[str]] = {}
    for name in stages:
        st = _json(suite / "status" / f"{name}.json")
        if st is None:
            continue
        env = st.get("env") or default or {}
        machines.setdefault((env.get("device", "unknown device"), env.get("stack", "unknown stack")), []).append(name)
    if not machines and default:
        machines[(default.get("device", "unknown device"), default.get("stack", "unknown stack"))] = []
    return machines


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**NOT met**")


def report(suite: Path, today: str) -> tuple[list[str], list[str]]:
    """(markdown lines, problems): the rows for BENCHMARKS.md and what failed or could not be measured."""
    stages = ("tests", "step", "pipeline", "smoke", *(f"modes_{m}" for m in MODES))
    machines = _machines(suite, stages)
    if len(machines) <= 1:
        device, stack = next(iter(machines), ("unknown device", "unknown stack"))
        lines = [f"\n## GPU suite, {today}, {device}, {stack}\n\n"]
    else:  # the device tool may start each call on another kind of machine: figures compare within a stage only
        lines = [f"\n## GPU suite, {today}, on {len(machines)} machines\n\n"] + [
            f"- {device}, {stack}: {', '.join(names)}\n" for (device, stack), names in machines.items()] + ["\n"]
    lines.append("`bash tools/gpu_suite.sh` (stages: " + ", ".join(f"{n} {_status(suite, n)}" for n in stages)
                 + ")\n\n")
    problems: list[str] = []

    # ---- GPU-only tests
    tests = suite / "tests.txt"
    last = tests.read_text().strip().splitlines()[-1:] if tests.is_file() else []
    tests_status = _status(suite, "tests")
    lines.append(f"- GPU-only tests: {tests_status}" + (f" ({last[0]})" if last else "") + "\n")
    if not tests_status.startswith("ok"):
        problems.append(f"GPU-only tests: {tests_status} (see {tests})")

    # ---- step profiler
    graph_sps = official_sps = graph_syncs = sinkhorn_ms = None
    prof = _json(suite / "profile_step.json")
    if prof is None:
        problems.append(f"profile_step: {_status(suite, 'step')} (see {suite / 'profile_step.txt'})")
    else:
        a = prof.get("args", {})
        if prof.get("partial"):  # written after Sinkhorn alone, then after every mode
            done, modes = len(prof.get("rows", [])), len(a.get("modes") or [])
            where = ("while timing Sinkhorn alone" if "sinkhorn" not in prof else
                     f"after {done} of {modes} modes" if done < modes else
                     "after every mode, before its table (FLOPs not counted)")
            problems.append(f"profile_step stopped {where}: {_status(suite, 'step')} "
                            f"(see {suite / 'profile_step.txt'})")
        flops = (f"{prof['flops_per_step'] / 1e9:.1f} GFLOP per step" if prof.get("flops_per_step")
                 else "FLOPs not counted")
        lines.append(f"\n{a.get('arch', '?')}, {a.get('batch', '?')} images x {a.get('counts', '?')} crops of "
                     f"{a.get('sizes', '?')}, K {a.get('prototypes', '?')}, queue {a.get('queue', '?')}, "
                     f"{flops}:\n\n"
                     "| mode | ms/step | samples/s | host syncs | ATen ops | peak GiB | TFLOP/s | MFU |\n"
                     "|---|---|---|---|---|---|---|---|\n")
        for r in prof.get("rows", []):
            if "error" in r:
                lines.append(f"| {r['mode']} | FAILED: {r['error'][:200]} | | | | | | |\n")
                problems.append(f"profile_step {r['mode']} mode: {r['error'][:200]}")
                continue
            syncs, ops = ("-" if r.get(k) is None else r[k] for k in ("host_syncs_per_step", "aten_ops_per_step"))
            mem = "-" if r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.2f}"
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
            tflops = "-" if r.get("tflops_per_s") is None else f"{r['tflops_per_s']:.1f}"
            lines.append(f"| {r['mode']} | {r['ms_per_step']:.2f} | {r['samples_per_s']:.0f} | {syncs} | {ops} "
                         f"| {mem} | {tflops} | {mfu} |\n")
            if r["mode"] == "graph":
                graph_sps, graph_syncs = r["samples_per_s"], r.get("host_syncs_per_step")
            elif r["mode"] == "official":
                official_sps = r["samples_per_s"]
        sk = prof.get("sinkhorn", [])
        if sk:
            lines.append(f"\n- Sinkhorn alone, K {sk[0]['k']} x B {sk[0]['b']}: " + ", ".join(
                f"{s['impl']} " + (f"{s['ms']:.3f} ms" if "ms" in s else f"FAILED ({s['error'][:120]})")
                for s in sk) + "\n")
            # the target is the kernels' time: the CUDA-graph replay where it was measured, else the eager call
            fused = sorted((s for s in sk if s["impl"].startswith("triton")), key=lambda s: "graph" not in s["impl"])
            timed = [s for s in fused if "ms" in s]
            if timed:
                sinkhorn_ms = timed[0]["ms"]
            for s in fused:
                if "error" in s:
                    problems.append(f"fused Sinkhorn, {s['impl']}: {s['error'][:200]}")

    # ---- pipeline profiler
    pipe_sps = None
    pipe = _json(suite / "profile_pipeline.json")
    if pipe is None:
        problems.append(f"profile_pipeline: {_status(suite, 'pipeline')} (see {suite / 'profile_pipeline.txt'})")
    else:
        lines.append("\n| pipeline (64 images, 2x224 + 6x96) | samples/s | ms/batch | decode ms | augment ms |\n"
                     "|---|---|---|---|---|\n")
        for r in pipe.get("rows", []):
            dec, aug = (f"{r[k]:.1f}" if k in r else "-" for k in ("decode_ms_per_batch", "augment_ms_per_batch"))
            lines.append(f"| {r['pipeline']} | {r['samples_per_s']:.0f} | {r['ms_per_batch']:.1f} | {dec} | {aug} |\n")
            if r["pipeline"] == "decode+augment":
                pipe_sps = r["samples_per_s"]
        for k, v in pipe.get("host_cost", {}).items():
            lines.append(f"- host CPU time per sample, {k}: {v['cpu_ms_per_sample']:.3f} ms\n")
        for n in pipe.get("not_run", []):
            lines.append(f"- pipeline not run: {n}\n")
            if ": failed (" in n:
                problems.append(f"profile_pipeline, {n}")
        if pipe.get("partial"):  # rewritten after every measurement; cut off before the end
            problems.append(f"profile_pipeline stopped before the end: {_status(suite, 'pipeline')} "
                            f"(see {suite / 'profile_pipeline.txt'})")

    # ---- training smoke run
    smoke = _metrics(suite / "smoke_run" / "metrics.jsonl")
    epochs, steps = smoke.epochs, [r for r in smoke.steps if "samples_per_s" in r]
    smoke_status = _status(suite, "smoke")
    if epochs or steps:
        last_it = max((r["iteration"] for r in [*smoke.steps, *epochs] if "iteration" in r), default=0)
        lines.append(f"\n- training smoke run (reference pipeline, graph mode, 64 images per step): {smoke_status}; "
                     f"{len(epochs)} epochs, iteration {last_it}"
                     + (", epoch losses " + ", ".join(f"{e['loss']:.3f}" for e in epochs) if epochs else "")
                     + (f"; last logged {steps[-1]['samples_per_s']:.0f} samples/s" if steps else "") + "\n")
    if not smoke_status.startswith("ok"):
        problems.append(f"training smoke run: {smoke_status} (see {suite / 'smoke_run.txt'})")

    # ---- eager / compile / graph on the same config
    losses = {m: [r["loss"] for r in _metrics(suite / f"modes_{m}" / "metrics.jsonl").steps] for m in MODES}
    for m in MODES:
        st = _status(suite, f"modes_{m}")
        if not st.startswith("ok"):
            problems.append(f"{m} mode training run: {st} (see {suite / f'modes_{m}.txt'})")
    if losses["eager"]:
        lines.append("- eager losses, step by step: " + ", ".join(f"{v:.4f}" for v in losses["eager"]) + "\n")
        for m in ("compile", "graph"):
            if losses[m] and len(losses[m]) == len(losses["eager"]):
                diff = max(abs(a - b) for a, b in zip(losses[m], losses["eager"], strict=True))
                lines.append(f"- {m} vs eager, {len(losses[m])} steps (bf16): largest loss difference {diff:.2e}\n")
            else:
                lines.append(f"- {m} vs eager: no comparison ({len(losses[m])} of {len(losses['eager'])} steps)\n")

    # ---- targets
    speedup = graph_sps / official_sps if graph_sps and official_sps else None
    checks = [
        (f"graph mode >= {TARGET_GRAPH_SAMPLES_PER_S} samples/s per GPU", graph_sps,
         None if graph_sps is None else graph_sps >= TARGET_GRAPH_SAMPLES_PER_S, "{:.0f} samples/s"),
        (f"graph mode >= {TARGET_SPEEDUP_OVER_OFFICIAL:g}x the official-style step", speedup,
         None if speedup is None else speedup >= TARGET_SPEEDUP_OVER_OFFICIAL, "{:.2f}x"),
        ("0 host syncs per step in graph mode", graph_syncs, None if graph_syncs is None else graph_syncs == 0,
         "{}"),
        (f"fused Sinkhorn <= {TARGET_SINKHORN_MS} ms at K 3000 x B 3904", sinkhorn_ms,
         None if sinkhorn_ms is None else sinkhorn_ms <= TARGET_SINKHORN_MS, "{:.3f} ms"),
        (f"device-side decode + augment >= {TARGET_PIPELINE_SAMPLES_PER_S} samples/s", pipe_sps,
         None if pipe_sps is None else pipe_sps >= TARGET_PIPELINE_SAMPLES_PER_S, "{:.0f} samples/s"),
    ]
    lines.append("\nTargets:\n")
    for what, value, ok, fmt in checks:
        lines.append(f"- {what}: " + ("-" if value is None else fmt.format(value)) + f", {_verdict(ok)}\n")
        if ok is False:
            problems.append(f"target not met: {what} (measured {fmt.format(value)})")
    lines.append("- not covered by this suite on one GPU: the 2-rank NCCL captured step (its test skips) and torchrun "
                 "with --step_mode compile or graph\n")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", type=Path, help="the directory tools/gpu_suite.sh wrote (default there: gpu_suite_out)")
    p.add_argument("--append", type=Path, help="also append the rows to this file (BENCHMARKS.md)")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    args = p.parse_args(argv)
    if not args.suite.is_dir():
        p.error(f"{args.suite} is not a directory; run tools/gpu_suite.sh first (it writes gpu_suite_out/)")
    lines, problems = report(args.suite, args.date)
    text = "".join(lines)
    (args.suite / "benchmark_rows.md").write_text(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write(text)
    print(text)
    print("not run, failed or below target:" if problems else "every stage ran and every target is met")
    for line in problems:
        print(f"  - {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
