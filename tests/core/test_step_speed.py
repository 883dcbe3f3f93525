"""The training step's speed: host synchronisations per step, fused AdamW, channels_last, torch.compile, OOM.

A device->host synchronisation stalls the CPU until the GPU has run everything queued before
it, so the next step's kernels cannot be queued behind this one's. On the CPU every tensor is a
host tensor, so the count here is of the reads that would wait for the device on a GPU: a
tensor's value read into Python (item, bool, int, float, tolist, numpy) by the training code,
plus collectives (each one all-reduce is a wait for every rank). Reads of tensors that live on
the host on every device are not counted: the data pipeline's batches before they cross,
caption dropout's CPU draw, the tokenizer's ids, and the optimizer's step counters (torch keeps
those on the CPU unless fused or capturable). Where CUDA exists the count is checked as well with
torch.cuda.set_sync_debug_mode, which sees every synchronising call.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import latentdiff.core
from latentdiff.core import runtime as runtime_module
from latentdiff.core.train import Run

ROOT = Path(latentdiff.core.__file__).resolve().parent.parent  # the project's folders: core/, prior/, data/, ...
TORCH = Path(torch.__file__).resolve().parent
READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "barrier")


def _host_site(filename: str, function: str) -> bool:
    """A read of a tensor that is on the host whatever the run's device (see the module's docstring)."""
    path = Path(filename).resolve()
    if path.is_relative_to(ROOT / "data") or path.is_relative_to(TORCH / "utils" / "data"):
        return True  # batches are assembled on the host, then cross to the device
    if path.is_relative_to(TORCH / "optim") and not path.name == "swa_utils.py":
        return True  # optimizer step counters (state["step"]) stay on the CPU unless fused/capturable
    if path == ROOT / "prior" / "stage.py" and function == "drop_captions":
        return True  # torch.rand(B) on the CPU generator
    return path == ROOT / "text" / "tokens.py" or "open_clip" in path.parts  # token ids, built on the host


@dataclass
class Step:
    """What one training step waited for, each as "what at file:line function"."""

    reads: list[str] = field(default_factory=list)  # device->host reads (each one a wait for the device on a GPU)
    votes: list[str] = field(default_factory=list)  # collectives the run issues to decide together (Run's own)
    # Collectives that move numbers the step computes with (the PatchGAN's gradients and adaptive weight):
    # launched and left to run, the host never waits on them (NCCL); they are listed, not limited.
    data: list[str] = field(default_factory=list)


@dataclass
class SyncCounter:
    """Device->host reads and collectives, per training step (between two yields of `Run.steps`)."""

    steps: list[Step] = field(default_factory=list)
    _active: bool = False

    def install(self, monkeypatch) -> SyncCounter:
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        for name in COLLECTIVES:
            monkeypatch.setattr(dist, name, self._collective(name))
        original = Run.steps

        def steps(run):
            for step in original(run):
                self.steps.append(Step())
                self._active = True
                yield step
            self._active = False

        monkeypatch.setattr(Run, "steps", steps)
        return self

    def _caller(self):
        frame = sys._getframe(2)  # 0: here, 1: the patched method, 2: its caller
        while frame is not None and Path(frame.f_code.co_filename).resolve() == TORCH / "_tensor.py":
            frame = frame.f_back
        return frame

    @staticmethod
    def _site(what: str, frame) -> str:
        return f"{what} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"

    def _wrap(self, method, name):
        def read(tensor, *args, **kwargs):
            frame = self._caller()
            if self._active and frame is not None and not _host_site(frame.f_code.co_filename, frame.f_code.co_name):
                self.steps[-1].reads.append(self._site(name, frame))
            return method(tensor, *args, **kwargs)

        return read

    def _collective(self, name):
        def collective(*args, **kwargs):  # the fake second rank agrees with this one: nothing to combine
            frame = self._caller()
            if not self._active or frame is None:
                return
            asker = frame  # who asked for it, past Runtime's helpers (any_rank, all_reduce_sum, ...)
            while asker is not None and Path(asker.f_code.co_filename).resolve() == ROOT / "core" / "runtime.py":
                asker = asker.f_back
            by_run = asker is not None and Path(asker.f_code.co_filename).resolve() == ROOT / "core" / "train.py"
            (self.steps[-1].votes if by_run else self.steps[-1].data).append(self._site(f"dist.{name}", frame))

        return collective

    def middle(self) -> list[Step]:
        """The steps other than the first (lazy optimizer state, the EMA's first copy) and the last (final save)."""
        return self.steps[1:-1]


def fake_two_ranks(monkeypatch) -> None:
    """Run a stage in this one process as rank 0 of 2: its collectives are counted (SyncCounter), not sent."""
    setup = runtime_module.Runtime.setup.__func__

    def two_ranks(cls, *args, **kwargs):
        rt = setup(cls, *args, **kwargs)
        rt.world_size = 2
        return rt

    monkeypatch.setattr(runtime_module.Runtime, "setup", classmethod(two_ranks))
    monkeypatch.setattr(runtime_module.Runtime, "wrap", lambda self, model: model)


QUIET = ["--set", "train.log_every=0", "--set", "train.sample_every=0", "--set", "train.ckpt_every=0"]


# ---------------------------------------------------------------- host synchronisations per step


def _prior(data, ae_run, text_run, out, *extra):
    from latentdiff.prior.stage import main
    from tests.helpers import PRIOR_ARGS

    args = ["--data", str(data), "--autoencoder", str(ae_run[0]), "--text", str(text_run[0]), *PRIOR_ARGS]
    return main([*args, "--out", str(out), *extra])


def _autoencoder(data, out, *extra):
    from latentdiff.autoencoder.stage import main
    from tests.helpers import AE_ARGS

    return main(["--data", str(data), *AE_ARGS, "--set", "eval_images=4", "--out", str(out), *extra])


def _decoder(data, ae_run, out, *extra):
    from latentdiff.decoder.stage import main

    args = ["--data", str(data), "--autoencoder", str(ae_run[0]), "--batch-size", "4", "--set", "eval_images=4"]
    return main([*args, "--out", str(out), *extra])


@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "two-ranks"])
@pytest.mark.parametrize("stage", ["prior", "autoencoder", "decoder", "autoencoder+gan"])
def test_a_training_step_synchronises_with_the_host_at_most_once(
    stage, ranks, data, ae_run, text_run, tmp_path, monkeypatch
):
    from tests.helpers import GAN_ARGS

    if ranks == 2:
        fake_two_ranks(monkeypatch)
    counter = SyncCounter().install(monkeypatch)
    common = ["--steps", "4", "--set", "train.ema_decay=0.9", *QUIET]
    if stage == "prior":
        _prior(data, ae_run, text_run, tmp_path / "run", *common)
    elif stage == "decoder":
        _decoder(data, ae_run, tmp_path / "run", *common)
    else:
        _autoencoder(data, tmp_path / "run", *common, *(GAN_ARGS if stage.endswith("gan") else []))
    assert len(counter.steps) == 4
    for waits in counter.middle():
        assert len(waits.reads) <= 1 and len(waits.votes) <= ranks - 1, "\n".join(waits.reads + waits.votes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_on_cuda_every_synchronising_call_of_a_step_is_counted_and_at_most_one(
    data, ae_run, text_run, tmp_path, monkeypatch
):
    """CUDA's own account: every call that waits for the device (reads, blocking copies), not only reads."""
    import warnings

    counter = SyncCounter().install(monkeypatch)
    waits: list[list[str]] = []
    shown = warnings.showwarning

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        if counter._active:
            while len(waits) < len(counter.steps):
                waits.append([])
            waits[len(counter.steps) - 1].append(f"{filename}:{lineno}")

    monkeypatch.setattr(warnings, "showwarning", note)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _prior(data, ae_run, text_run, tmp_path / "run", "--steps", "4", "--device", "cuda", *QUIET)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(counter.steps) == 4
    for step in waits[1:3]:
        assert len(step) <= 1, step


# ---------------------------------------------------------------- AdamW's kernel


def test_adamw_is_fused_on_cuda_and_foreach_elsewhere():
    from latentdiff.core.train import adamw_kernel

    assert adamw_kernel({"cuda"}) == {"fused": True}
    assert adamw_kernel({"cpu"}) == adamw_kernel({"cuda", "cpu"}) == adamw_kernel({"mps"}) == {"foreach": True}


def test_every_optimizer_takes_the_chosen_kernel_and_the_cpu_keeps_its_numbers():
    from latentdiff.core.train import TrainConfig, make_optimizer
    from latentdiff.decoder.losses import DecoderLoss, DecoderLossConfig

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 1, 1))
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = make_optimizer(model.parameters(), cfg)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    disc = DecoderLoss(DecoderLossConfig(disc_weight=0.5, disc_channels=8, disc_layers=2)).discriminator_optimizer()
    assert disc.defaults["foreach"] is True and not disc.defaults["fused"]
    # torch's default on the CPU (foreach=None) is the per-tensor loop: foreach gives the same bits.
    decay = [p for p in twin if p.ndim >= 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": [p for p in twin if p.ndim < 2], "weight_decay": 0}]
    loop = torch.optim.AdamW(groups, lr=1e-2, betas=cfg.betas, foreach=False)
    for step in range(3):
        for p, q in zip(model.parameters(), twin):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = p.grad.clone()
        opt.step()
        loop.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW is chosen on CUDA only")
def test_adamw_is_fused_for_parameters_on_cuda():
    from latentdiff.core.train import TrainConfig, make_optimizer

    model = torch.nn.Linear(4, 4).cuda()
    opt = make_optimizer(model.parameters(), TrainConfig())
    assert opt.defaults["fused"] is True
    model(torch.randn(2, 4, device="cuda")).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)


# ---------------------------------------------------------------- channels_last and torch.compile


def _conv_run(tmp_path, **train):
    import types

    from latentdiff.core.runtime import Runtime
    from latentdiff.core.train import TrainConfig

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 1))
    config = types.SimpleNamespace(train=TrainConfig(**train))
    run = Run(tmp_path, "test", config, Runtime(torch.device("cpu")), resuming=False)
    return run, model


def test_channels_last_puts_weights_ema_and_inputs_in_nhwc(tmp_path):
    from latentdiff.core.ema import EMA

    run, model = _conv_run(tmp_path, channels_last=True)
    ema = EMA(model, 0.9)
    run.begin({"model": model}, {"model": torch.optim.AdamW(model.parameters())}, ema)
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    net = run.wrap(model)
    nhwc = torch.channels_last
    assert model[0].weight.is_contiguous(memory_format=nhwc) and ema.module[0].weight.is_contiguous(memory_format=nhwc)
    x = torch.randn(2, 3, 8, 8)
    out = net(x)
    assert seen[0].is_contiguous(memory_format=nhwc) and not x.is_contiguous(memory_format=nhwc)
    plain = _conv_run(tmp_path / "plain")[1]
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, plain(x))  # the same function, in another layout
    assert plain[0].weight.is_contiguous() and not plain[0].weight.is_contiguous(memory_format=nhwc)


def _logged(run: Path, *keys: str) -> list[list[float]]:
    import json

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [[m[k] for k in keys] for m in lines if "loss" in m]


def test_an_autoencoder_trains_in_channels_last_as_it_does_without(data, tmp_path):
    from tests.helpers import run_weights

    common = ["--steps", "3", *QUIET, "--set", "train.log_every=1"]
    _autoencoder(data, tmp_path / "nchw", *common)
    _autoencoder(data, tmp_path / "nhwc", *common, "--set", "train.channels_last=true")
    # The same losses and gradient norms step by step (the layout changes the order of sums, not the function).
    a, b = _logged(tmp_path / "nchw", "loss", "grad_norm"), _logged(tmp_path / "nhwc", "loss", "grad_norm")
    assert len(a) == 3
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=0)
    saved = run_weights(tmp_path / "nhwc")  # saved in the ordinary layout, under the same names
    assert saved.keys() == run_weights(tmp_path / "nchw").keys() and all(t.is_contiguous() for t in saved.values())


def _aot_eager(monkeypatch) -> list:
    """torch.compile with the aot_eager backend (dynamo and AOT autograd, no code generation: seconds, not minutes)."""
    compiled, compile = [], torch.compile

    def quick(model, **kwargs):
        compiled.append(model)
        return compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", quick)
    return compiled


def test_a_compiled_prior_trains_and_its_checkpoint_loads_into_a_plain_unet(
    data, ae_run, text_run, tmp_path, monkeypatch
):
    from latentdiff.core import checkpoint as ckpt
    from latentdiff.core.config import load_toml
    from latentdiff.prior.config import PriorConfig
    from latentdiff.prior.unet import UNet
    from tests.helpers import run_weights

    compiled = _aot_eager(monkeypatch)
    run, plain = tmp_path / "compiled", tmp_path / "plain"
    summary = _prior(data, ae_run, text_run, run, "--steps", "2", "--set", "train.compile=true", *QUIET)
    assert summary["steps"] == 2 and len(compiled) == 1 and isinstance(compiled[0], UNet)
    unet = UNet(load_toml(PriorConfig, ckpt.committed_file(run, ckpt.CONFIG)).model)
    weights = run_weights(run)
    assert weights.keys() == unet.state_dict().keys()  # the bare module's names, no "_orig_mod."
    unet.load_state_dict(weights, strict=True)
    # The compiled forward trains the model the plain one does.
    _prior(data, ae_run, text_run, plain, "--steps", "2", *QUIET)
    for k, v in run_weights(plain).items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- out of memory


def test_out_of_memory_in_a_step_is_one_line_naming_the_fixes_and_keeps_the_checkpoint(
    data, ae_run, text_run, tmp_path, monkeypatch, capsys
):
    from latentdiff.core import checkpoint as ckpt
    from latentdiff.prior.unet import UNet

    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    forward, calls = UNet.forward, []

    def runs_out(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third step, after the checkpoint of step 2
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
            )
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", runs_out)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        _prior(data, ae_run, text_run, run, "--steps", "4", *QUIET, "--set", "train.ckpt_every=2")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err[-1].startswith("latentdiff: error: prior step 3 on cpu: out of device memory")
    line = err[-1]
    assert "tried to allocate 2.00 gib" in line and "last checkpoint kept (step 2)" in line
    fixes = ["train.batch_size (now 4: --batch-size 2)", "model.gradient_checkpointing=true", 'train.precision="bf16"']
    assert [line.index(f) for f in fixes] == sorted(line.index(f) for f in fixes)  # named, in this order
    assert ckpt.read_meta(run)["step"] == 2 and not (run / "summary.json").exists()
    monkeypatch.setattr(UNet, "forward", forward)  # memory to spare again: the run resumes from the kept step
    from latentdiff.prior.stage import main

    assert main(["--resume", str(run)])["steps"] == 4
