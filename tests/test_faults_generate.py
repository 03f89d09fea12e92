"""A hostile user against `python -m cs336_nb.generate` and `python -m cs336_nb.quickstart`: a table of attacks,
each checked for its exit status, one stderr line naming the problem (for a refusal), no hang, and the run's
files byte for byte as they were.

For generate: a model whose vocabulary (300 ids) is larger than its tokenizer's (the 257 of a byte-level
tokenizer with `<|endoftext|>`), its extra `lm_head` rows scaled up so that unmasked decoding does draw them;
tiny but valid `--temperature` and `--top-p` (1e-300, 5e-324), whose output must equal a hand-written argmax
loop; and bad flags, pipes and devices. For quickstart: flags that would fail only after training are refused
before any work, and `--checkpoint-dir X` samples from X's run in a real process, which must also run with the
allocator tuning `train` gets (seen by a `sitecustomize` that records each interpreter start's environment).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, call_main

from cs336_nb.checkpoint import save_checkpoint
from cs336_nb.generate import main as generate_main
from cs336_nb.model import TransformerLM
from cs336_nb.quickstart import main as quickstart_main
from cs336_nb.runtime import MALLOC_TUNABLES, tuned_malloc_env
from cs336_nb.tokenizer import Tokenizer

TIMEOUT = 60  # seconds for any one in-process attack
PROMPT = "Once upon"
EOT = 256
MAINS = {"generate": generate_main, "quickstart": quickstart_main}


def cli(prog: str, argv: list, cwd: Path | None = None, timeout: int = TIMEOUT) -> tuple[int, str, str]:
    """`python -m cs336_nb.<prog> argv` in this process, under an alarm: (exit status, stdout, stderr)."""
    return call_main(MAINS[prog], argv, cwd, timeout)


def command(prog: str, argv: list, cwd: Path) -> tuple[int, str, str]:
    """`python -m cs336_nb.<prog> argv` in a real process (for attacks that could crash the interpreter)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CS336_MALLOC_TUNING": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", f"cs336_nb.{prog}", *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    return proc.returncode, proc.stdout, proc.stderr


# torch crashes (SIGSEGV) when asked for 100,000 threads: a regression must not take the test process with it
REAL_PROCESS = {"--threads 100000 (torch crashes)", "--threads 100000"}


def snapshot(d: Path) -> dict[str, str]:
    """Every regular file under `d` and a hash of its bytes."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def one_line(err: str, prog: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)} | {EOT: b"<|endoftext|>"}, [], ["<|endoftext|>"])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """wide/: a run whose model has 300 ids and whose tokenizer has 257; also a pipe and a plain file."""
    d = tmp_path_factory.mktemp("faults_generate")
    torch.manual_seed(0)
    model = TransformerLM(
        vocab_size=300, context_length=32, d_model=32, num_layers=1, num_heads=2, d_ff=64, rope_theta=10000.0
    ).eval()
    with torch.no_grad():
        model.lm_head.weight[257:] *= 50  # ids the tokenizer lacks get logits far from 0, many the largest
    save_checkpoint(model, None, 4, d / "wide" / "checkpoint_4.pt", config=model.config)
    byte_tokenizer().save(d / "wide" / "tokenizer")
    os.mkfifo(d / "pipe")
    (d / "plain.txt").write_text("not a folder")
    return d


def wide_model(work: Path) -> TransformerLM:
    checkpoint = torch.load(work / "wide" / "checkpoint_4.pt", weights_only=True)
    model = TransformerLM.from_config(checkpoint["config"]).eval()
    model.load_state_dict(checkpoint["model_state_dict"])
    return model


def hand_greedy(model: TransformerLM, new_tokens: int, decodable: int | None) -> list[int]:
    """The reference: argmax over the first `decodable` logits (all if None), one full forward per token."""
    ids = list(PROMPT.encode("utf-8"))
    out = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            next_id = int(logits[:decodable].argmax())
            if next_id == EOT:
                break
            ids.append(next_id)
            out.append(next_id)
    return out


GEN = ["--checkpoint", "wide", "--prompt", PROMPT, "--device", "cpu", "--threads", 1, "--max-new-tokens", 12]

# attack: extra flags, and what must hold: "greedy" (stdout is the hand argmax loop's text) or a refusal's words
GENERATE_ATTACKS = {
    "vocab larger than the tokenizer, greedy": (["--temperature", 0], "greedy"),
    "--temperature 1e-300": (["--temperature", 1e-300], "greedy"),
    "--temperature 5e-324 (the smallest float)": (["--temperature", 5e-324], "greedy"),
    "--top-p 1e-300": (["--top-p", 1e-300], "greedy"),
    "--top-p 5e-324, --temperature 1e-300": (["--top-p", 5e-324, "--temperature", 1e-300], "greedy"),
    "--top-k 1, --temperature 3": (["--top-k", 1, "--temperature", 3], "greedy"),
    "--temperature 1e300 (a flat distribution)": (["--temperature", 1e300, "--top-p", 1], "samples"),
    "--top-k 10**9": (["--top-k", 10**9, "--temperature", 2], "samples"),
    "vocab larger than the tokenizer, 300 hot samples": (
        ["--temperature", 3, "--top-p", 1, "--max-new-tokens", 300, "--seed", 1, "--num-samples", 2],
        "samples",
    ),
    "--temperature 1e400 (inf)": (["--temperature", "1e400"], "temperature must be"),
    "--temperature=-1e-300": (["--temperature=-1e-300"], "temperature must be"),
    "--top-p 1e-400 (0 once parsed)": (["--top-p", "1e-400"], "top_p must be"),
    "--top-p nan": (["--top-p", "nan"], "top_p must be"),
    "--max-new-tokens -1": (["--max-new-tokens", -1], "--max-new-tokens"),
    "--checkpoint ''": (["--checkpoint", ""], "--checkpoint is empty"),
    "--checkpoint is a pipe": (["--checkpoint", "pipe"], "pipe"),
    "--checkpoint is /dev/zero": (["--checkpoint", "/dev/zero"], "/dev/zero"),
    "--tokenizer is a file": (["--tokenizer", "plain.txt"], "--tokenizer"),
    "--tokenizer is a pipe": (["--tokenizer", "pipe"], "--tokenizer"),
    "--prompt ''": (["--prompt", ""], "empty prompt"),
    "--tokenizer ''": (["--tokenizer", ""], "--tokenizer is empty"),
    "--threads 100000 (torch crashes)": (["--threads", 100_000], "--threads must be in"),
}


@pytest.mark.parametrize("case", list(GENERATE_ATTACKS))
def test_generate_attack(case, work):
    extra, expect = GENERATE_ATTACKS[case]
    before = snapshot(work)
    run = command if case in REAL_PROCESS else cli
    code, out, err = run("generate", [*GEN, *extra], cwd=work)
    assert snapshot(work) == before
    if expect not in ("greedy", "samples"):
        assert code == 2, (out, err)
        one_line(err, "generate", expect)
        return
    assert code == 0 and "Traceback" not in err, err
    assert "sampling only the 257 ids its tokenizer decodes" in err.splitlines()[0], err
    assert all(line.startswith(("loaded ", "generated ")) for line in err.splitlines()), err
    if expect == "greedy":
        new = hand_greedy(wide_model(work), 12, decodable=257)
        assert out == PROMPT + byte_tokenizer().decode(new) + "\n"
        assert hand_greedy(wide_model(work), 12, decodable=None) != new  # the mask made a difference
    else:
        counts = [int(line.split()[1]) for line in err.splitlines() if line.startswith("generated ")]
        assert counts and all(0 <= c <= 300 for c in counts), err


# --- quickstart ---------------------------------------------------------------------------------------------------

QUICKSTART_ATTACKS = {  # flags: words of the one line; refused before anything is prepared or trained
    "--prompt ''": (["--prompt", ""], "empty --prompt"),
    "--max-new-tokens -1": (["--max-new-tokens", -1], "--max-new-tokens must be >= 0"),
    "--seed -1": (["--seed", -1], "--seed must be in"),
    "--config is a pipe": (["--config", "{work}/pipe"], "no config at"),
    "--config is a folder": (["--config", "{work}"], "no config at"),
    "--threads 0": (["--threads", 0], "--threads"),
    "--threads 100000": (["--threads", 100_000], "--threads must be in"),
    "--corpus-bytes 0": (["--corpus-bytes", 0], "--corpus-bytes must be positive"),
}


@pytest.mark.parametrize("case", list(QUICKSTART_ATTACKS))
def test_quickstart_refuses_before_any_work(case, work, tmp_path):
    flags, words = QUICKSTART_ATTACKS[case]
    flags = [str(f).format(work=work) for f in flags]
    run = command if case in REAL_PROCESS else cli
    code, out, err = run("quickstart", flags, cwd=tmp_path)
    assert code == 2, (out, err)
    one_line(err, "quickstart", words)
    assert out == "" and list(tmp_path.iterdir()) == []  # nothing prepared, nothing trained


MINI = dict(vocab_size=300, num_layers=1, d_model=32, num_heads=2, d_ff=64, context_length=32, batch_size=4)
MINI |= dict(max_iters=3, warmup_iters=1, log_interval=1, eval_interval=3, eval_iters=1, checkpoint_interval=3)


def test_quickstart_samples_from_its_checkpoint_dir_with_tuned_malloc(tmp_path):
    """--checkpoint-dir X: training writes X and the sample is X's, while the config's own directory holds
    another run (untouched); the process runs with the malloc tunables, as `train` does."""
    if tuned_malloc_env({}) is None:
        pytest.skip("no glibc malloc tunables on this platform")
    config = json.loads((ROOT / "configs" / "quickstart.json").read_text())
    config |= MINI | dict(checkpoint_dir=str(tmp_path / "config_run"))
    for key in ("train_data", "val_data", "tokenizer_dir"):
        config[key] = config[key].replace("pystdlib", "mini")
    (tmp_path / "mini.json").write_text(json.dumps(config))
    torch.manual_seed(1)  # another run in the config's directory, with other weights
    other = TransformerLM.from_config({k: config[k] for k in ("vocab_size", "context_length", "d_model", "num_layers",
                                                               "num_heads", "d_ff", "rope_theta")})  # fmt: skip
    save_checkpoint(other, None, 99, tmp_path / "config_run" / "checkpoint_99.pt", config=other.config)
    byte_tokenizer().save(tmp_path / "config_run" / "tokenizer")
    before = snapshot(tmp_path / "config_run")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "with open(os.environ['STARTS_LOG'], 'a') as f:\n"
        "    f.write(repr(os.environ.get('GLIBC_TUNABLES')) + '\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CS336_MALLOC_TUNING")}
    env |= dict(PYTHONPATH=f"{hooks}{os.pathsep}{ROOT}", STARTS_LOG=str(tmp_path / "starts.log"), OMP_NUM_THREADS="1")
    env |= dict(WANDB_MODE="offline", WANDB_SILENT="true")
    argv = ["--config", "mini.json", "--corpus-bytes", 150_000, "--max-new-tokens", 16, "--threads", 1]
    proc = subprocess.run(
        [sys.executable, "-m", "cs336_nb.quickstart", *map(str, argv), "--checkpoint-dir", "x_run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    starts = (tmp_path / "starts.log").read_text().splitlines()
    assert starts == ["None", repr(MALLOC_TUNABLES)], starts  # started plain, then once re-executed tuned
    assert "== 3/3 sample from x_run/checkpoint_3.pt: 'def '" in proc.stdout, proc.stdout[-2000:]
    assert sorted(p.name for p in (tmp_path / "x_run").glob("checkpoint_*.pt")) == ["checkpoint_3.pt"]
    assert snapshot(tmp_path / "config_run") == before  # the other run: untouched, and not sampled
    shutil.rmtree(hooks)
