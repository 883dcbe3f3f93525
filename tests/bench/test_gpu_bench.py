"""`python -m bench.gpu`, the prepared GPU check: its help, its refusal without a GPU, its watchdog, its CPU smoke run.

No GPU figure is asserted (there is none here): the smoke run proves that every section's code
runs end to end at toy sizes and that the report holds what the script says it measures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench import gpu
from bench.gpu import plan as gpu_plan
from bench.gpu import speed as gpu_speed

REPO = Path(__file__).resolve().parents[2]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _python(code: str, env=NO_GPU, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_says_what_it_runs_without_importing_torch():
    done = _python(
        """
        import sys
        from bench import gpu
        try:
            gpu.main(["--help"])
        except SystemExit as e:
            print("exit", e.code)
        print("torch imported:", "torch" in sys.modules)
        """
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "exit 0" in out and "torch imported: False" in out
    for words in ("--device cuda", "bf16", "resume", "serve", "batch 32", "flop_counter", "UNet2DConditionModel",
                  "SD-1.5", "JPEG", "40% MFU", "275 images/s", "66 steps/s", "2x", "Per-section limits"):  # fmt: skip
        assert words in out, f"--help does not say {words!r}"
    assert "--cpu-smoke" not in out  # the tests' option stays out of the user's help


def test_refuses_without_a_gpu_in_one_line_before_importing_torch(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--out", str(out)], cwd=REPO, env=NO_GPU, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("bench.gpu: no CUDA GPU here")
    assert not out.exists()
    probe = _python(
        """
        import sys
        from bench import gpu
        try:
            gpu.main([])
        except SystemExit as e:
            print("exit", e.code, "torch imported:", "torch" in sys.modules)
        """
    )
    assert "exit 2 torch imported: False" in probe.stdout, probe.stdout + probe.stderr


def test_a_gpu_torch_cannot_use_is_refused_naming_the_torch_build(monkeypatch):
    monkeypatch.setattr(gpu, "cuda_driver_devices", lambda: 1)  # a driver that sees a GPU ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ... that this torch build cannot use
    why = gpu.refusal()
    assert why.startswith("bench.gpu: the driver reports a GPU") and torch.__version__ in why and "\n" not in why
    with pytest.raises(SystemExit) as e:
        gpu.main(["--sections", "data"])
    assert e.value.code == gpu.REFUSED


@pytest.mark.parametrize(
    "name, part, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.0),
        ("NVIDIA H200", "H200 SXM", 989.0),
        ("NVIDIA GH200 480GB", "GH200", 989.0),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ],
)
def test_peak_flops_come_from_the_table_by_device_name(name, part, tflops):
    assert gpu_plan.peak_tflops(name) == (part, tflops)


def test_a_device_not_in_the_table_gives_no_mfu_rather_than_a_guess(monkeypatch):
    assert gpu_plan.peak_tflops("Tesla T4") is None
    assert gpu_speed.peak(torch.device("cpu"))[1] is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    text, value = gpu_speed.peak(torch.device("cuda", 0))
    assert value is None and text == "unknown device (NVIDIA GeForce RTX 3090)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert gpu_speed.peak(torch.device("cuda", 0)) == ("H100 SXM, 989 TFLOP/s bf16 dense", 989.0)


@pytest.mark.parametrize("sizes", [gpu_plan.FULL, gpu_plan.SMOKE], ids=["base", "tiny"])
def test_the_diffusers_unet_is_built_at_our_config(sizes):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    from latentdiff.prior.unet import UNet

    cfg = gpu_speed.prior_config(sizes, ("model.gradient_checkpointing=false",))
    with torch.device("meta"):  # the base UNet's 853M parameters, without their memory
        ours = UNet(cfg.model)
        theirs = UNet2DConditionModel(**gpu_speed.diffusers_config(cfg.model))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert theirs.config.cross_attention_dim == cfg.model.context_dim
    assert sum("CrossAttn" in b for b in theirs.config.down_block_types) == len(cfg.model.attention_levels)


def test_the_generation_unet_has_sd15_sizes():
    _, model = gpu_speed.sd15_config(gpu_plan.FULL)
    assert (model.channels, model.num_res_blocks, model.attention_levels) == ((320, 640, 1280, 1280), 2, (0, 1, 2))
    assert (model.heads, model.context_dim) == (8, 768)
    assert gpu_plan.FULL.sd_latent == 64 and gpu_plan.FULL.generation_batches == (1, 8)
    assert sum(gpu_plan.FULL.limits_s.values()) <= 8 * 60 - 20  # the sections fit 8 minutes with start-up


FAKE_CHILD = """
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
names, work = args[args.index("--child") + 1].split(","), Path(args[args.index("--work") + 1])
def write(path, data):
    path.with_suffix(".tmp").write_text(json.dumps(data))
    os.replace(path.with_suffix(".tmp"), path)
for name in names:
    write(work / f"{name}.started", {"time": time.time()})
    write(work / f"{name}.partial.json", {"rows": [[name, "first row"]], "columns": ["a", "b"]})
    if name == "stages":
        time.sleep(600)  # hangs past its limit
    if name == "train_step":
        os._exit(3)  # dies mid-section
    write(work / f"{name}.json", {"status": "ok", "rows": [[name, "done"]], "columns": ["a", "b"], "pid": os.getpid()})
"""


def test_a_section_that_hangs_or_dies_is_recorded_and_the_next_one_runs(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(FAKE_CHILD)
    sizes = dataclasses.replace(gpu_plan.SMOKE, limits_s={"stages": 2, "train_step": 20, "generation": 20, "data": 20})
    results = gpu.run_sections(list(gpu_plan.SECTIONS), tmp_path, sizes, False, [sys.executable, str(child)])
    assert list(results) == list(gpu_plan.SECTIONS)
    assert results["stages"]["status"] == "failed" and results["stages"]["error"] == "stopped at its 2 s limit"
    assert results["stages"]["rows"] == [["stages", "first row"]]  # what it had recorded is kept
    assert results["train_step"]["error"] == "its process ended with exit code 3"
    assert results["generation"]["status"] == results["data"]["status"] == "ok"
    assert results["generation"]["pid"] == results["data"]["pid"]  # one fresh child ran the rest
    text, _ = gpu.markdown(results, {}, 1.0, smoke=False)
    assert "**Section failed: stopped at its 2 s limit** (rows above: what finished)" in text


def test_a_section_that_raises_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(sizes, work, record, earlier):
        record({"rows": [["a row"]], "columns": ["x"]})
        raise RuntimeError("CUDA out of memory\nmore")

    def after(sizes, work, record, earlier):
        return {"rows": [], "columns": [], "goals": [], "saw": sorted(earlier)}

    monkeypatch.setattr(gpu_speed, "train_step", broken)
    monkeypatch.setattr(gpu_speed, "generation", after)
    gpu.run_child(["train_step", "generation"], tmp_path, gpu_plan.SMOKE)
    failed = json.loads((tmp_path / "train_step.json").read_text())
    assert failed == {
        "rows": [["a row"]],
        "columns": ["x"],
        "status": "failed",
        "error": "RuntimeError: CUDA out of memory",
    }
    assert json.loads((tmp_path / "generation.json").read_text())["saw"] == ["train_step"]


def test_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        env=NO_GPU,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_plan.SECTIONS)
    failed = {name: s.get("error") for name, s in sections.items() if s["status"] != "ok"}
    assert not failed, f"{failed}\n{done.stdout[-3000:]}"
    stages = [row[0] for row in sections["stages"]["rows"]]
    for command in ("train autoencoder", "train text", "train prior", "--resume", "train decoder",
                    "train classifier", "generate", "serve"):  # fmt: skip
        assert any(command in s for s in stages), f"no {command} row"
    assert all(row[2] == "ok" for row in sections["stages"]["rows"]), sections["stages"]["rows"]
    variants = sections["train_step"]["figures"]["variants"]
    assert [v["variant"] for v in variants] == [label for label, _ in gpu_speed.variants(gpu_plan.SMOKE)]
    assert all("error" not in v and v["images_per_s"] > 0 and v["model_tflop_per_step"] > 0 for v in variants)
    assert all(v["mfu"] is None for v in variants)  # a CPU has no peak in the table: no MFU, no guess
    ours, theirs = variants[1], variants[3]  # checkpointing off: ours and diffusers' at the same config
    assert ours["params"] == theirs["params"]
    rows = sections["generation"]["figures"]["rows"]
    assert [(r["batch_size"], r["compiled"]) for r in rows] == [(1, False), (2, False), (1, True)]
    assert all(r["unet_calls"] == gpu_plan.SMOKE.generation_steps for r in rows)  # one guided call per step
    data = sections["data"]["figures"]
    best = max(v["images_per_s"] for v in variants if "diffusers" not in v["variant"])
    assert data["consumed_images_per_s"] == pytest.approx(best) and data["ratio"] == pytest.approx(
        data["images_per_s"] / best
    )
    goals = [g["goal"] for g in report["goals"]]
    assert len(goals) == 5 and all(isinstance(g["met"], bool) or g["met"] is None for g in report["goals"])
    table = out.with_suffix(".md").read_text()
    assert "CPU smoke run" in table and "### Goals" in table and "measures nothing" in table
