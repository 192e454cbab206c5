"""tools/gpu_suite.sh and tools/gpu_suite_report.py without a GPU: the stage logic, and the report built from real
outputs of the profilers and of train.py run on CPU (the figures differ on a GPU, the file formats do not)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TINY

import train
from tools import gpu_suite_report, profile_pipeline, profile_step

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_suite.sh"


def suite_copy(tmp_path: Path) -> Path:
    """The script and its report writer in a scratch checkout, so the report stage appends to a scratch
    BENCHMARKS.md and never to the repository's."""
    root = tmp_path / "checkout"
    (root / "tools").mkdir(parents=True)
    # the report reads metrics.jsonl with plot_metrics' reader
    for name in ("gpu_suite.sh", "gpu_suite_report.py", "plot_metrics.py", "__init__.py"):
        shutil.copy(REPO / "tools" / name, root / "tools" / name)
    return root


def _archive(path: Path) -> dict[str, str]:
    """{member name: text} of the archive gpu_suite.sh packs for the device tool."""
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def bash(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "tools" / "gpu_suite.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable, **env})


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_unknown_stage_is_named(tmp_path):
    res = bash(suite_copy(tmp_path), "tests", "benchmarks")
    assert res.returncode == 2 and "unknown stage 'benchmarks'" in res.stdout and "tests step pipeline" in res.stdout
    res = bash(suite_copy(tmp_path / "b"), "modes", MODES="eager fast")
    assert res.returncode == 2 and "unknown step mode 'fast'" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no CUDA device")
def test_gpu_stages_refuse_without_cuda(tmp_path):
    res = bash(suite_copy(tmp_path), "tests")
    assert res.returncode == 1 and "sees no CUDA device" in res.stdout


def test_report_stage_with_nothing_run_names_every_gap(tmp_path):
    root = suite_copy(tmp_path)
    out = tmp_path / "out"
    res = bash(root, "report", SUITE_DIR=str(tmp_path / "suite"), COPY_TO=str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = (root / "BENCHMARKS.md").read_text()
    assert "## GPU suite" in rows and "tests not run" in rows and "GPU-only tests: not run" in rows
    assert rows.count("not measured") == 5 and "met**" not in rows  # five targets, none measured
    for gap in ("GPU-only tests", "profile_step", "profile_pipeline", "training smoke run", "graph mode training"):
        assert gap in res.stdout
    assert _archive(out / "gpu_suite.tgz")["./benchmark_rows.md"] == rows


@pytest.fixture(scope="module")
def cpu_suite(tmp_path_factory, digits_dir, photo_folder) -> Path:
    """A suite directory filled by the real tools on CPU, at tiny sizes."""
    suite = tmp_path_factory.mktemp("suite")
    (suite / "status").mkdir()
    (suite / "env.json").write_text(json.dumps({"device": "cpu", "stack": f"torch {torch.__version__}"}))
    assert profile_step.main(["--device", "cpu", "--arch", "resnet18", "--batch", "4", "--sizes", "32", "16",
                              "--counts", "2", "1", "--prototypes", "10", "--queue", "8", "--steps", "1", "--warmup",
                              "1", "--modes", "official", "eager", "--sinkhorn-shape", "30", "40",
                              "--json", str(suite / "profile_step.json")]) == 0
    assert profile_pipeline.main(["--data", str(photo_folder), "--pipelines", "reference", "--batch-size", "4",
                                  "--batches", "1", "--warmup", "1", "--workers", "0", "--sizes", "32", "16",
                                  "--counts", "2", "2", "--host-cost", "4",
                                  "--json", str(suite / "profile_pipeline.json")]) == 0
    for name in ("smoke_run", "modes_eager"):
        assert train.main([*TINY, "--data_path", str(digits_dir), "--run_dir", str(suite / name)]) == 0
    (suite / "tests.txt").write_text("....\n4 passed in 1.00s\n")
    for name in ("tests", "step", "pipeline", "smoke", "modes_eager"):
        (suite / "status" / f"{name}.json").write_text(json.dumps({"status": "ok", "seconds": 3, "log": "x"}))
    return suite


def test_report_from_real_cpu_outputs(cpu_suite):
    lines, problems = gpu_suite_report.report(cpu_suite, "2026-01-02")
    text = "".join(lines)
    prof = json.loads((cpu_suite / "profile_step.json").read_text())
    official = next(r for r in prof["rows"] if r["mode"] == "official")
    assert "## GPU suite, 2026-01-02, cpu" in text
    assert f"| official | {official['ms_per_step']:.2f} | {official['samples_per_s']:.0f} |" in text
    assert "- Sinkhorn alone, K 30 x B 40: reference" in text
    assert "| decode+augment |" in text and "| reference |" in text and "host CPU time per sample, reference" in text
    assert "training smoke run (reference pipeline, graph mode, 64 images per step): ok, 3 s; 2 epochs" in text
    assert "- compile vs eager: no comparison (0 of 8 steps)" in text
    # no graph row and no fused Sinkhorn on CPU; the decode+augment figure exists and is far below 3000 samples/s
    assert text.count("not measured") == 4 and "device-side decode + augment >= 3000 samples/s" in text
    assert any(p.startswith("target not met: device-side decode") for p in problems)
    assert any("compile mode training run: not run" in p for p in problems)


def test_report_verdicts_follow_the_figures(cpu_suite, tmp_path):
    """The same outputs with a graph row, a fused Sinkhorn and identical mode losses added: every verdict is the
    comparison of the figure with its target, both ways."""
    suite = tmp_path / "suite"
    shutil.copytree(cpu_suite, suite)
    prof = json.loads((suite / "profile_step.json").read_text())
    official = next(r for r in prof["rows"] if r["mode"] == "official")
    official["samples_per_s"] = 900.0
    prof["rows"].append({**official, "mode": "graph", "samples_per_s": 1850.0, "host_syncs_per_step": 0})
    prof["sinkhorn"].append({"impl": "triton", "k": 30, "b": 40, "ms": 0.13, "ms_min": 0.12})  # with launches
    prof["sinkhorn"].append({"impl": "triton (CUDA graph)", "k": 30, "b": 40, "ms": 0.08, "ms_min": 0.07})
    (suite / "profile_step.json").write_text(json.dumps(prof))
    for mode in ("compile", "graph"):
        shutil.copytree(suite / "modes_eager", suite / f"modes_{mode}")
        (suite / "status" / f"modes_{mode}.json").write_text(json.dumps({"status": "ok", "seconds": 1}))
    text = "".join(gpu_suite_report.report(suite, "2026-01-02")[0])
    assert "graph mode >= 1800 samples/s per GPU: 1850 samples/s, **met**" in text
    assert "graph mode >= 2x the official-style step: 2.06x, **met**" in text
    assert "0 host syncs per step in graph mode: 0, **met**" in text
    assert "fused Sinkhorn <= 0.1 ms at K 3000 x B 3904: 0.080 ms, **met**" in text
    assert "- compile vs eager, 8 steps (bf16): largest loss difference 0.00e+00" in text

    prof["rows"][-1].update(samples_per_s=1700.0, host_syncs_per_step=2)
    prof["rows"].append({"mode": "compile", "error": "BackendCompilerFailed: boom", "device": "cpu"})
    prof["sinkhorn"][-1] = {"impl": "triton (CUDA graph)", "k": 30, "b": 40, "error": "RuntimeError: capture"}
    prof["sinkhorn"][-2]["ms"] = 0.25  # then the eager call's time is the figure
    (suite / "profile_step.json").write_text(json.dumps(prof))
    lines, problems = gpu_suite_report.report(suite, "2026-01-02")
    text = "".join(lines)
    assert "graph mode >= 1800 samples/s per GPU: 1700 samples/s, **NOT met**" in text
    assert "0 host syncs per step in graph mode: 2, **NOT met**" in text
    assert "fused Sinkhorn <= 0.1 ms at K 3000 x B 3904: 0.250 ms, **NOT met**" in text
    assert "| compile | FAILED: BackendCompilerFailed: boom |" in text
    assert "profile_step compile mode: BackendCompilerFailed: boom" in problems
    assert "fused Sinkhorn, triton (CUDA graph): RuntimeError: capture" in problems


def test_copy_to_packs_the_small_outputs_into_one_archive(cpu_suite, tmp_path):
    """The device tool returns at most 8 files a call: COPY_TO gets one archive, without images or checkpoints."""
    root = suite_copy(tmp_path)
    suite = tmp_path / "suite"
    shutil.copytree(cpu_suite, suite)
    (suite / "synthetic" / "c0").mkdir(parents=True)
    (suite / "synthetic" / "c0" / "notes.txt").write_text("not copied")
    out = tmp_path / "out"
    res = bash(root, "report", SUITE_DIR=str(suite), COPY_TO=str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert [p.name for p in out.iterdir()] == ["gpu_suite.tgz"]
    packed = _archive(out / "gpu_suite.tgz")
    for name in ("./benchmark_rows.md", "./profile_step.json", "./smoke_run/metrics.jsonl", "./status/tests.json"):
        assert name in packed
    assert not any(c.startswith("./synthetic") or c.endswith((".pth", ".png")) for c in packed)
    assert any(p.suffix == ".pth" for p in suite.rglob("*"))  # checkpoints and trunks were there, and stayed


def fake_python(tmp_path: Path, sleeps: dict[str, int]) -> Path:
    """A stand-in for the GPU machine's python3: every check passes, env.json names a fake GPU, and a stage's
    command sleeps the seconds given for the tool it runs ("-m pytest", "tools/profile_step.py", ...)."""
    cases = "\n".join(f'    *"{tool}"*) sleep {secs} ;;' for tool, secs in sleeps.items())
    script = tmp_path / "python3"
    script.write_text(f"""#!/usr/bin/env bash
if [ "$1" = - ]; then
    cat > /dev/null
    case "$2" in *env.json) echo '{{"device": "Fake GPU", "stack": "torch 0"}}' > "$2" ;; *) mkdir -p "$2" ;; esac
    exit 0
fi
case "$1 $2" in
{cases}
esac
exit 0
""")
    script.chmod(0o755)
    return script


def test_a_call_keeps_to_its_time_and_packs_after_every_stage(tmp_path):
    """CALL_SECONDS=58: the first stage (2 s) runs; the second gets what is left less 20 s (36 s) and is cut there;
    the third would get less than 30 s and is not started, but marked so. The archive holds all three statuses,
    each naming the machine."""
    root = suite_copy(tmp_path)
    py = fake_python(tmp_path, {"-m pytest": 2, "tools/profile_step.py": 100})
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(root / "tools" / "gpu_suite.sh"), "tests", "step", "pipeline"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": str(py), "SUITE_DIR": str(tmp_path / "suite"),
                              "COPY_TO": str(out), "CALL_SECONDS": "58"})
    assert res.returncode == 0, res.stdout + res.stderr
    packed = _archive(out / "gpu_suite.tgz")
    st = {n: json.loads(packed[f"./status/{n}.json"]) for n in ("tests", "step", "pipeline")}
    assert st["tests"]["status"] == "ok" and st["tests"]["env"]["device"] == "Fake GPU"
    assert st["step"]["status"].startswith("timed out after 3") and 30 <= st["step"]["seconds"] <= 40
    assert st["pipeline"]["status"].startswith("not run: this call had") and "CALL_SECONDS=58" in \
        st["pipeline"]["status"]
    assert "pipeline: not run" in res.stdout and "run it in another call" in res.stdout
    lines, problems = gpu_suite_report.report(tmp_path / "suite", "2026-01-02")
    assert "## GPU suite, 2026-01-02, Fake GPU, torch 0" in "".join(lines)
    assert any(p.startswith("profile_pipeline: not run: this call had") for p in problems)


def test_report_names_each_machine_when_calls_ran_on_different_ones(cpu_suite, tmp_path):
    suite = tmp_path / "suite"
    shutil.copytree(cpu_suite, suite)
    for name, device in (("tests", "NVIDIA H100"), ("step", "NVIDIA H200")):
        (suite / "status" / f"{name}.json").write_text(json.dumps(
            {"status": "ok", "seconds": 1, "env": {"device": device, "stack": "torch 2.11"}}))
    text = "".join(gpu_suite_report.report(suite, "2026-01-02")[0])
    assert "## GPU suite, 2026-01-02, on 3 machines" in text
    assert "- NVIDIA H100, torch 2.11: tests\n" in text and "- NVIDIA H200, torch 2.11: step\n" in text
    assert "- cpu, torch " in text  # the stages whose status names no machine: env.json's


def test_a_cut_off_profile_keeps_its_finished_modes(cpu_suite, tmp_path):
    """profile_step writes its rows after every mode; a time limit in a later mode leaves those rows, reported as
    partial."""
    suite = tmp_path / "suite"
    shutil.copytree(cpu_suite, suite)
    prof = json.loads((suite / "profile_step.json").read_text())
    partial = {"args": {**prof["args"], "modes": ["official", "eager", "graph", "compile"]},
               "rows": [r for r in prof["rows"] if r["mode"] == "official"], "sinkhorn": prof["sinkhorn"],
               "partial": True}
    (suite / "profile_step.json").write_text(json.dumps(partial))
    (suite / "status" / "step.json").write_text(json.dumps({"status": "timed out after 540 s", "seconds": 550}))
    lines, problems = gpu_suite_report.report(suite, "2026-01-02")
    text = "".join(lines)
    assert "FLOPs not counted" in text and "| official |" in text and "| - | - |" in text  # no TFLOP/s, no MFU
    assert "profile_step stopped after 1 of 4 modes: timed out after 540 s, 550 s" in " ".join(problems)
    # every mode measured (Sinkhorn alone came first), then cut off before the table and its FLOP count
    (suite / "profile_step.json").write_text(json.dumps({**prof, "partial": True}))
    _, problems = gpu_suite_report.report(suite, "2026-01-02")
    assert "profile_step stopped after every mode, before its table (FLOPs not counted): timed out" in \
        " ".join(problems)
    # cut off in Sinkhorn alone, the first thing it times
    (suite / "profile_step.json").write_text(json.dumps({"args": prof["args"], "rows": [], "partial": True}))
    _, problems = gpu_suite_report.report(suite, "2026-01-02")
    assert "profile_step stopped while timing Sinkhorn alone: timed out" in " ".join(problems)


def test_profile_step_writes_sinkhorn_then_rows_after_each_mode(tmp_path, monkeypatch):
    seen = []
    real = profile_step.profile

    def spy(mode, *a, **k):
        out = tmp_path / "p.json"
        seen.append([r["mode"] for r in json.loads(out.read_text())["rows"]] if out.exists() else None)
        return real(mode, *a, **k)

    monkeypatch.setattr(profile_step, "profile", spy)
    out = str(tmp_path / "p.json")
    assert profile_step.main(["--device", "cpu", "--arch", "resnet18", "--batch", "2", "--sizes", "32", "--counts",
                              "2", "--prototypes", "10", "--queue", "0", "--steps", "1", "--warmup", "1", "--modes",
                              "official", "eager", "--sinkhorn-shape", "10", "8", "--json", out]) == 0
    assert seen == [[], ["official"]]  # written before and after Sinkhorn alone, which comes first
    assert "partial" not in json.loads((tmp_path / "p.json").read_text())


def test_profile_pipeline_keeps_going_after_a_failed_measurement(photo_folder, tmp_path, monkeypatch):
    """The decode+augment row failing (nvJPEG refusing a batch, say) costs that row only: the reference pipeline and
    the host cost are still measured, the JSON is rewritten after each measurement, the exit code says a
    measurement failed, and the report lists it."""
    seen = []
    out = tmp_path / "suite" / "profile_pipeline.json"
    out.parent.mkdir()

    def broken(*a, **k):
        raise RuntimeError("nvjpeg says no")

    def spy(*a, **k):  # the reference host cost runs last: the JSON holds the rows measured before it
        seen.append(json.loads(out.read_text()))
        return real_cost(*a, **k)

    real_cost = profile_pipeline.reference_host_cost
    monkeypatch.setattr(profile_pipeline, "time_device_side", broken)
    monkeypatch.setattr(profile_pipeline, "reference_host_cost", spy)
    assert profile_pipeline.main(["--data", str(photo_folder), "--pipelines", "reference", "--batch-size", "4",
                                  "--batches", "1", "--warmup", "1", "--workers", "0", "--sizes", "32", "16",
                                  "--counts", "2", "2", "--host-cost", "4", "--json", str(out)]) == 1
    assert seen[0]["partial"] and [r["pipeline"] for r in seen[0]["rows"]] == ["reference"]
    rep = json.loads(out.read_text())
    assert "partial" not in rep and [r["pipeline"] for r in rep["rows"]] == ["reference"]
    assert rep["host_cost"]["reference"]["samples"] == 4
    assert rep["not_run"] == ["decode+augment: failed (RuntimeError: nvjpeg says no)"]
    _, problems = gpu_suite_report.report(out.parent, "2026-01-02")
    assert "profile_pipeline, decode+augment: failed (RuntimeError: nvjpeg says no)" in problems
