"""End-to-end checks of `python -m cs336_nb.bench` on a tiny shape: its FLOP count and MFU agree with
PyTorch's own FLOP counter, the malloc re-exec happened, each contender's peak RSS was probed in its
own process, and bad input is one line on stderr with exit status 2."""

import json
import platform
import sys

import torch
from conftest import run_module
from torch.utils.flop_counter import FlopCounterMode

from cs336_nb.model import TransformerLM

TINY = [
    "--vocab-size",
    "128",
    "--context-length",
    "32",
    "--d-model",
    "32",
    "--num-layers",
    "2",
    "--num-heads",
    "4",
    "--d-ff",
    "64",
]


def _run(args, **env):
    # without GLIBC_TUNABLES, so the benchmark's own malloc re-exec is what gets tested
    return run_module("bench", *args, env={"GLIBC_TUNABLES": None, **env})


def test_bench_cli_tiny(tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"context_length": 32, "batch_size": 8, "max_lr": 1e-3, "train_data": "unused.npy"}))
    out = tmp_path / "bench.json"
    proc = _run(
        [
            "--config",
            str(config),
            *TINY[:2],
            *TINY[4:],
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--variants",
            "ours,native",
            "--json",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    cfg = result["config"]
    assert (cfg["context_length"], cfg["batch_size"], cfg["d_model"]) == (32, 3, 32)  # config, then flags
    assert set(result["variants"]) == {"ours", "native"} and len(result["peak_samples"]) == 2
    # the FLOPs of one training step, counted by PyTorch on the same shape (from-scratch attention: plain matmuls)
    shape = dict(vocab_size=128, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=64, rope_theta=1e4)
    with FlopCounterMode(display=False) as counter:
        TransformerLM(**shape, attn_impl="reference")(torch.randint(0, 128, (3, 32))).sum().backward()
    assert result["flops_per_token"] == counter.get_total_flops() / (3 * 32)
    for name, v in result["variants"].items():
        assert len(v["samples"]) == 2
        steps = sorted(s["step"] for s in v["samples"])
        assert abs(v["step_s"] - sum(steps) / 2) < 1e-9  # the median of two
        assert abs(v["tokens_per_s"] - 3 * 32 / v["step_s"]) < 1e-6 * v["tokens_per_s"]
        flop_rate = counter.get_total_flops() / v["step_s"]  # FLOP/s of the median step
        assert abs(v["mfu"] - flop_rate / result["peak_flops"]) < 1e-9 * v["mfu"]
        assert 50e6 < v["peak_memory_bytes"] < 8e9  # a real process RSS: torch alone is > 50 MB
        assert name in proc.stdout
    per_round = [
        b["step"] / a["step"]
        for a, b in zip(result["variants"]["ours"]["samples"], result["variants"]["native"]["samples"])
    ]
    assert abs(result["ratios"]["ours/native"] - sum(per_round) / 2) < 1e-9
    fastest = [min(s["step"] for s in result["variants"][n]["samples"]) for n in ("native", "ours")]
    assert abs(result["ratios_fastest"]["ours/native"] - fastest[0] / fastest[1]) < 1e-9
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert result["malloc_tuned"]  # main re-executed itself with GLIBC_TUNABLES


def test_bench_cli_opt_out_and_bad_input(tmp_path):
    proc = _run(
        [
            *TINY,
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--variants",
            "ours",
            "--peak-repeats",
            "0",
            "--no-memory-probe",
            "--json",
            str(tmp_path / "r.json"),
        ],
        CS336_MALLOC_TUNING="0",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert not result["malloc_tuned"] and result["peak_flops"] is None and result["variants"]["ours"]["mfu"] is None
    # bad input: one line on stderr, exit status 2 (the notebook checks more messages in-process)
    proc = _run(["--config", str(tmp_path / "missing.json")])
    assert proc.returncode == 2 and proc.stderr.startswith("bench: error: config file not found"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
