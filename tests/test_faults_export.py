"""A hostile user against the Hugging Face bridge: `python -m cs336_nb.export` (where it may write, what an
overwrite may replace, a full disk, the file-size limit, SIGTERM, SIGHUP and kill -9 in the middle) and
`python -m cs336_nb.train --init-from DIR` (a Hugging Face directory is untrusted input: its config.json and its
safetensors files may be anything).

Every attack is a row of a table: it sets a scene up in its own folder, runs the command, and is checked for
its exit status, a stderr of exactly one line holding the listed words (the file and the field), and the
hashes of the files it guards, which must not change. Attacks that need a process of their own (a signal, the
file-size limit, kill -9, a working directory) and a few of each kind run `python -m cs336_nb.<command>` in a
subprocess with a timeout, a few at a time; the rest call the command's `main` in this process (no interpreter
and torch start-up each time), while the subprocesses run. One module fixture runs them all; one test per row
reads its result.
"""

import hashlib
import importlib
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import DATA, ROOT, TINY_MODEL, TINY_RUN, flags, write_tiny_tokens

from cs336_nb.checkpoint import save_checkpoint
from cs336_nb.export import save_hf
from cs336_nb.model import TransformerLM
from cs336_nb.runtime import MALLOC_TUNABLES
from cs336_nb.tokenizer import Tokenizer, train_bpe

TIMEOUT = 180  # seconds for any one subprocess (a hang fails the row instead of the whole run)
WORKERS = 4  # subprocesses at a time
EXPORT_MODEL = dict(TINY_MODEL, vocab_size=300)  # room for the 300-token BPE tokenizer of the run


@dataclass
class Attack:
    name: str
    command: str  # "export" or "train"
    setup: Callable[[Path, Path], list]  # (the shared base, this attack's folder) -> the command's arguments
    words: tuple[str, ...] = ()  # the one stderr line holds each, "{d}" standing for the attack's folder
    status: int = 2
    guard: tuple[str, ...] = ("hf", "run")  # folders whose files must keep their bytes ("." for all)
    patch: str = ""  # code run in the process before the command (a fault injected at a chosen moment)
    fsize: int | None = None  # RLIMIT_FSIZE in bytes, SIGXFSZ ignored: writes beyond it fail with EFBIG
    cwd: str | None = None
    after: Callable[[Path], None] | None = None  # further checks on the folder afterwards
    leftovers: bool = False  # hidden staging folders may stay (kill -9 leaves no chance to clean up)
    process: bool = False  # a real `python -m` process even without a fault to inject

    @property
    def in_a_process(self) -> bool:
        return self.process or bool(self.patch) or self.fsize is not None


# --- the scenes ----------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes (links and folders by what they are)."""
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        name = str(p.relative_to(folder))
        if p.is_symlink():
            out[name] = "link -> " + os.readlink(p)
        elif p.is_file():
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[name] = "dir" if p.is_dir() else "other"
    return out


def _export_scene(base: Path, d: Path) -> None:
    """`d/run`: the run (a checkpoint and its tokenizer); `d/hf`: an earlier export of it."""
    shutil.copytree(base / "run", d / "run")
    shutil.copytree(base / "export", d / "hf")


def export_args(extra: list | None = None, out: str = "{d}/hf"):
    def setup(base: Path, d: Path) -> list:
        _export_scene(base, d)
        return ["{d}/run", "--out", out, *(extra or [])]

    return setup


def export_into(prepare: Callable[[Path], str], *extra: str):
    """An export whose --out `prepare(d)` makes ready and names."""

    def setup(base: Path, d: Path) -> list:
        _export_scene(base, d)
        return ["{d}/run", "--out", prepare(d), *extra]

    return setup


def _foreign(d: Path) -> str:
    (d / "theirs").mkdir()
    (d / "theirs" / "model.safetensors").write_bytes(b"someone's weights")
    (d / "theirs" / "tokenizer.json").write_text('{"someone": "else"}')
    return "{d}/theirs"


def _other_run(d: Path) -> str:
    shutil.copytree(d / "run", d / "other_run")
    shutil.rmtree(d / "other_run" / "tokenizer")
    return "{d}/other_run"


def _notes_beside_export(d: Path) -> str:
    (d / "hf" / "notes.txt").write_text("my notes")
    return "{d}/hf"


def _a_file(d: Path) -> str:
    (d / "a_file").write_text("a file")
    return "{d}/a_file"


def _under_a_file(d: Path) -> str:
    _a_file(d)
    return "{d}/a_file/hf"


def _own_tokenizer(base: Path, d: Path) -> list:
    _export_scene(base, d)
    shutil.copytree(d / "run" / "tokenizer", d / "tok")
    return ["{d}/run", "--tokenizer", "{d}/tok", "--out", "{d}/tok", "--overwrite"]


def _empty_out(base: Path, d: Path) -> list:
    _export_scene(base, d)
    (d / "cwd").mkdir()
    (d / "cwd" / "notes.txt").write_text("the working directory")
    return ["{d}/run", "--out", ""]


def _with_generation_config(base: Path, d: Path) -> list:
    _export_scene(base, d)
    (d / "hf" / "generation_config.json").write_text('{"temperature": 9.0, "do_sample": true}')
    return ["{d}/run", "--out", "{d}/hf", "--overwrite", "--dtype", "bfloat16"]


def _through_a_link(base: Path, d: Path) -> list:
    _export_scene(base, d)
    (d / "link").symlink_to(d / "hf", target_is_directory=True)
    return ["{d}/run", "--out", "{d}/link", "--overwrite", "--dtype", "bfloat16"]


def _fresh_export_is_whole(d: Path) -> None:
    config = json.loads((d / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16", config
    assert sorted(p.name for p in (d / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # the earlier generation_config.json is gone with the earlier export
    weights = safetensors.torch.load_file(d / "hf" / "model.safetensors")
    assert weights["model.norm.weight"].dtype == torch.bfloat16


def _link_kept(d: Path) -> None:
    assert (d / "link").is_symlink() and (d / "link").resolve() == (d / "hf").resolve()
    _fresh_export_is_whole(d)


# faults injected inside a real export process, at a chosen moment
AFTER_FIRST_FILE = """
import os, signal
import cs336_nb.export as export
_write = export._write_file
def _write_file(path, data):
    _write(path, data)
    {action}
export._write_file = _write_file
"""
SWAP_INTERRUPTED = """
import os, signal
_rename = os.rename
def rename(src, dst):
    _rename(src, dst)
    if str(dst).endswith(".old"):  # the earlier export moved aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGTERM)
os.rename = rename
"""


# --- Hugging Face directories for --init-from ----------------------------------------------------------------------


def _hf_copy(base: Path, d: Path) -> Path:
    shutil.copytree(base / "hf_tiny", d / "hf")
    return d / "hf"


def train_args(base: Path, d: Path) -> list:
    settings = dict(train_data=base / "train.npy", val_data=base / "val.npy", **TINY_MODEL, **TINY_RUN)
    settings |= dict(max_iters=2, threads=1, seed=1, checkpoint_dir=d / "run")
    return [*flags(**settings), "--init-from", "{d}/hf"]


def with_config(text: str | bytes | None = None, **change):
    """--init-from a copy of the tiny model's export whose config.json holds `text`, or has `change` applied."""

    def setup(base: Path, d: Path) -> list:
        hf = _hf_copy(base, d)
        config = json.loads((hf / "config.json").read_text())
        for key, value in change.items():
            if value is ...:
                config.pop(key)
            else:
                config[key] = value
        content = text if text is not None else json.dumps(config)
        (hf / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        return train_args(base, d)

    return setup


def with_weights(change: Callable[[dict], dict] | None = None, raw: Callable[[bytes], bytes] | None = None):
    """--init-from a copy whose model.safetensors holds `change(tensors)`, or `raw(bytes)`."""

    def setup(base: Path, d: Path) -> list:
        hf = _hf_copy(base, d)
        data = (hf / "model.safetensors").read_bytes()
        if raw is not None:
            (hf / "model.safetensors").write_bytes(raw(data))
        else:
            safetensors.torch.save_file(change(safetensors.torch.load(data)), hf / "model.safetensors")
        return train_args(base, d)

    return setup


def with_index(index) -> Callable:
    """--init-from a copy whose weights are 'sharded': model.safetensors renamed, an index listing `index`."""

    def setup(base: Path, d: Path) -> list:
        hf = _hf_copy(base, d)
        (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
        return train_args(base, d)

    return setup


def with_scene(change: Callable[[Path], None]):
    def setup(base: Path, d: Path) -> list:
        change(_hf_copy(base, d))
        return train_args(base, d)

    return setup


def _config_is_a_fifo(hf: Path) -> None:
    (hf / "config.json").unlink()
    os.mkfifo(hf / "config.json")  # opening it to read would block until a writer comes: never


def _config_is_a_dir(hf: Path) -> None:
    (hf / "config.json").unlink()
    (hf / "config.json").mkdir()


def _wider(hf: Path) -> None:
    shutil.rmtree(hf)
    torch.manual_seed(0)
    save_hf(TransformerLM.from_config(TINY_MODEL | {"d_ff": 128}), hf)  # a whole Llama, of another shape


def _no_weights(hf: Path) -> None:
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")


def _nothing_there(base: Path, d: Path) -> list:
    return train_args(base, d)


Q = "model.layers.0.self_attn.q_proj.weight"
CONFIG, WEIGHTS, INDEX = "{d}/hf/config.json", "{d}/hf/model.safetensors", "{d}/hf/model.safetensors.index.json"
SHARD = "model-00001-of-00001.safetensors"


def _started_from_the_export(d: Path) -> None:
    assert (d / "run" / "checkpoint_2.pt").is_file()


ATTACKS = [
    # --- export: never write over what is not ours -----------------------------------------------------------------
    Attack(
        "export: someone's model files",
        "export",
        export_into(_foreign),
        ("{d}/theirs", "already holds files"),
        guard=(".",),
    ),
    Attack(
        "export: into the run directory",
        "export",
        export_args(["--overwrite"], out="{d}/run"),
        ("is the run directory",),
        process=True,
    ),
    Attack(
        "export: inside the run",
        "export",
        export_args(["--overwrite"], out="{d}/run/tokenizer"),
        ("is inside the run directory",),
    ),
    Attack(
        "export: above the run",
        "export",
        export_args(["--overwrite"], out="{d}"),
        ("holds the run directory",),
        guard=(".",),
    ),
    Attack(
        "export: a folder of checkpoints",
        "export",
        export_into(_other_run, "--overwrite"),
        ("checkpoint_4.pt", "not part of a Hugging Face"),
        guard=(".",),
    ),
    Attack(
        "export: notes beside an export",
        "export",
        export_into(_notes_beside_export, "--overwrite"),
        ("notes.txt", "not part of"),
        guard=(".",),
    ),
    Attack(
        "export: an export, no --overwrite",
        "export",
        export_args(),
        ("already holds an exported model", "--overwrite"),
        guard=(".",),
    ),
    Attack("export: over the tokenizer", "export", _own_tokenizer, ("is the tokenizer directory",), guard=(".",)),
    Attack("export: --out ''", "export", _empty_out, ("--out is empty",), guard=(".",), cwd="cwd", process=True),
    Attack("export: --out a file", "export", export_into(_a_file), ("a_file is a file",), guard=(".",)),
    Attack("export: --out under a file", "export", export_into(_under_a_file), ("{d}/a_file",), guard=(".",)),
    # --- export: atomic, whatever happens while it writes ----------------------------------------------------------
    Attack(
        "export: file-size limit",
        "export",
        export_args(["--overwrite"]),
        ("{d}/hf/model.safetensors", "file-size limit"),
        fsize=60_000,
    ),
    Attack(
        "export: disk full",
        "export",
        export_args(["--overwrite"]),
        ("{d}/hf/model.safetensors", "disk is full"),
        patch=AFTER_FIRST_FILE.format(action="raise OSError(28, 'No space left on device', str(path))"),
    ),
    Attack(
        "export: SIGTERM mid-write",
        "export",
        export_args(["--overwrite"]),
        ("interrupted",),
        status=130,
        patch=AFTER_FIRST_FILE.format(action="os.kill(os.getpid(), signal.SIGTERM)"),
    ),
    Attack(
        "export: SIGHUP mid-write",
        "export",
        export_args(["--overwrite"]),
        ("interrupted",),
        status=130,
        patch=AFTER_FIRST_FILE.format(action="os.kill(os.getpid(), signal.SIGHUP)"),
    ),
    Attack(
        "export: SIGTERM between the renames",
        "export",
        export_args(["--overwrite"]),
        ("interrupted",),
        status=130,
        patch=SWAP_INTERRUPTED,
    ),
    Attack(
        "export: kill -9 mid-write",
        "export",
        export_args(["--overwrite"]),
        (),
        status=-9,
        leftovers=True,
        patch=AFTER_FIRST_FILE.format(action="os.kill(os.getpid(), signal.SIGKILL)"),
    ),
    Attack(
        "export: overwrite drops stale files",
        "export",
        _with_generation_config,
        status=0,
        guard=("run",),
        after=_fresh_export_is_whole,
    ),
    Attack("export: overwrite through a link", "export", _through_a_link, status=0, guard=("run",), after=_link_kept),
    # --- --init-from: config.json is untrusted ---------------------------------------------------------------------
    Attack("init-from: config is a number", "train", with_config("7"), (CONFIG, "holds a number"), process=True),
    Attack("init-from: config is null", "train", with_config("null"), (CONFIG, "holds null")),
    Attack("init-from: config is torn", "train", with_config('{"vocab_size": 64, "hidden'), (CONFIG, "not valid JSON")),
    Attack("init-from: config not UTF-8", "train", with_config(b'{"model_type": "\xff"}'), (CONFIG, "not valid JSON")),
    Attack(
        "init-from: no intermediate_size",
        "train",
        with_config(intermediate_size=...),
        (CONFIG, "lacks intermediate_size"),
    ),
    Attack(
        "init-from: intermediate_size a string",
        "train",
        with_config(intermediate_size="64"),
        (CONFIG, "intermediate_size must be a positive integer, got '64'"),
    ),
    Attack(
        "init-from: eps a string", "train", with_config(rms_norm_eps="1e-5"), (CONFIG, "rms_norm_eps must be a number")
    ),
    Attack(
        "init-from: zero heads",
        "train",
        with_config(num_attention_heads=0),
        (CONFIG, "num_attention_heads must be a positive integer, got 0"),
    ),
    Attack("init-from: heads a float", "train", with_config(num_attention_heads=4.0), (CONFIG, "num_attention_heads")),
    Attack(
        "init-from: rope_theta Infinity",
        "train",
        with_config(rope_theta=math.inf, rope_parameters=None),
        (CONFIG, "rope_theta must be a positive finite number"),
    ),
    Attack(
        "init-from: rope_parameters a list",
        "train",
        with_config(rope_parameters=[1, 2]),
        (CONFIG, "rope_parameters must be an object"),
    ),
    Attack(
        "init-from: tie a string",
        "train",
        with_config(tie_word_embeddings="false"),
        (CONFIG, "tie_word_embeddings must be true or false"),
    ),
    Attack(
        "init-from: another architecture",
        "train",
        with_config(architectures=["MistralForCausalLM"], model_type="mistral"),
        (CONFIG, "only LlamaForCausalLM"),
    ),
    Attack(
        "init-from: config and weights disagree",
        "train",
        with_config(intermediate_size=128),
        (WEIGHTS, "config.json's sizes give (128, 32)"),
    ),
    Attack("init-from: another model's shape", "train", with_scene(_wider), ("{d}/hf", "d_ff=128 (the model: 64)")),
    Attack(
        "init-from: 10**12 positions",  # no weight depends on them: the run keeps its own context, nothing allocated
        "train",
        with_config(max_position_embeddings=10**12),
        status=0,
        guard=("hf",),
        after=_started_from_the_export,
    ),
    Attack(
        "init-from: config a FIFO",
        "train",
        with_scene(_config_is_a_fifo),
        ("no config.json file in {d}/hf",),
        process=True,
    ),
    Attack("init-from: config a folder", "train", with_scene(_config_is_a_dir), ("no config.json file in {d}/hf",)),
    Attack("init-from: no such directory", "train", _nothing_there, ("no config.json file in {d}/hf",)),
    # --- --init-from: the weights are untrusted --------------------------------------------------------------------
    Attack(
        "init-from: empty safetensors",
        "train",
        with_weights(raw=lambda b: b""),
        (WEIGHTS, "not a whole safetensors file"),
    ),
    Attack(
        "init-from: torn safetensors",
        "train",
        with_weights(raw=lambda b: b[: len(b) - 100]),
        (WEIGHTS, "not a whole safetensors file"),
        process=True,
    ),
    Attack(
        "init-from: garbage safetensors",
        "train",
        with_weights(raw=lambda b: b"\x10" + b[1:]),
        (WEIGHTS, "not a whole safetensors file"),
    ),
    Attack(
        "init-from: a tensor of the wrong shape",
        "train",
        with_weights(lambda t: t | {Q: t[Q][:16].contiguous()}),
        (WEIGHTS, Q, "has shape (16, 32)"),
    ),
    Attack(
        "init-from: integer weights",
        "train",
        with_weights(lambda t: t | {Q: t[Q].long()}),
        (WEIGHTS, Q, "dtype torch.int64"),
    ),
    Attack(
        "init-from: NaN weights",
        "train",
        with_weights(lambda t: t | {Q: t[Q] * math.nan}),
        (WEIGHTS, Q, "NaN or infinite"),
    ),
    Attack(
        "init-from: a missing tensor",
        "train",
        with_weights(lambda t: {k: v for k, v in t.items() if k != Q}),
        ("{d}/hf", Q),
    ),
    Attack(
        "init-from: a stray tensor",
        "train",
        with_weights(lambda t: t | {"model.extra.weight": torch.zeros(2)}),
        (WEIGHTS, "model.extra.weight"),
    ),
    Attack(
        "init-from: only pytorch_model.bin",
        "train",
        with_scene(_no_weights),
        ("no model.safetensors in {d}/hf", "pytorch_model.bin"),
    ),
    Attack(
        "init-from: weight_map a list", "train", with_index({"weight_map": [SHARD]}), (INDEX, "weight_map must map")
    ),
    Attack("init-from: index a number", "train", with_index(3), (INDEX, "weight_map must map")),
    Attack(
        "init-from: shard names not strings",
        "train",
        with_index({"weight_map": {Q: 1}}),
        (INDEX, "weight_map must map"),
    ),
    Attack(
        "init-from: shard outside the folder",
        "train",
        with_index({"weight_map": {Q: "../../etc/passwd"}}),
        (INDEX, "'../../etc/passwd', not a file in"),
    ),
    Attack(
        "init-from: a missing shard",
        "train",
        with_index({"weight_map": {Q: "model-00002-of-00002.safetensors"}}),
        ("{d}/hf/model-00002-of-00002.safetensors", "is not a file"),
    ),
    # --- --init-from: the negative control: a whole directory trains ------------------------------------------------
    Attack(
        "init-from: a whole export",
        "train",
        with_config(),
        status=0,
        guard=("hf",),
        after=_started_from_the_export,
        process=True,
    ),
]


# --- running the table ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A run to export (checkpoint + tokenizer), an earlier export of it, and the tiny model as a Llama directory."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("faults_export")
    write_tiny_tokens(d)
    torch.manual_seed(0)
    model = TransformerLM.from_config(EXPORT_MODEL)
    tokenizer = Tokenizer(*train_bpe(DATA / "corpus.en", 300, ["<|endoftext|>"]), ["<|endoftext|>"])
    save_checkpoint(model, None, 4, d / "run" / "checkpoint_4.pt", config=model.config)
    tokenizer.save(d / "run" / "tokenizer")
    save_hf(model, d / "export", tokenizer)
    torch.manual_seed(0)
    save_hf(TransformerLM.from_config(TINY_MODEL), d / "hf_tiny")
    return d


def _limit_file_size(size: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def _in_this_process(attack: Attack, d: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`main(argv)` of the command, here: its exit status and what it printed, as a finished process."""
    main = importlib.import_module(f"cs336_nb.{attack.command}").main
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            os.chdir(d / attack.cwd if attack.cwd else ROOT)
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception:  # a traceback the command let through: this row fails, the others still run
            code, _ = 1, err.write(traceback.format_exc())
        finally:
            os.chdir(here)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _launch(attack: Attack, d: Path, argv: list[str]) -> subprocess.CompletedProcess:
    module = f"cs336_nb.{attack.command}"
    code = ["-m", module] if not attack.patch else ["-c", attack.patch + f"\nimport {module}\n{module}.main()\n"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env |= {"GLIBC_TUNABLES": MALLOC_TUNABLES}  # train would re-exec itself to set them: one start-up, not two
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, *code, *argv],
        cwd=d / attack.cwd if attack.cwd else ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=TIMEOUT,
        preexec_fn=_limit_file_size(attack.fsize) if attack.fsize else None,
    )


@pytest.fixture(scope="module")
def outcomes(base, tmp_path_factory) -> dict:
    """Every attack set up, run and snapshotted: name -> (folder, process or timeout, files before, files after)."""
    scenes = {}
    for i, attack in enumerate(ATTACKS):
        d = tmp_path_factory.mktemp(f"attack{i}")
        argv = [str(a).replace("{d}", str(d)) for a in attack.setup(base, d)]
        guarded = {g: snapshot(d / g) for g in attack.guard}
        scenes[attack.name] = (d, argv, guarded)

    def run(attack: Attack):
        d, argv, guarded = scenes[attack.name]
        try:
            proc = _launch(attack, d, argv) if attack.in_a_process else _in_this_process(attack, d, argv)
        except subprocess.TimeoutExpired as hang:
            proc = hang
        return attack.name, (d, proc, guarded, {g: snapshot(d / g) for g in attack.guard})

    limited = [a for a in ATTACKS if a.fsize]  # preexec_fn: started before any thread is
    results = dict(run(a) for a in limited)
    with ThreadPoolExecutor(WORKERS) as pool:
        started = pool.map(run, [a for a in ATTACKS if a.in_a_process and not a.fsize])
        results |= dict(run(a) for a in ATTACKS if not a.in_a_process)  # main thread: signal handlers may be set
        results |= dict(started)
    return results


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack(attack: Attack, outcomes):
    d, proc, before, after = outcomes[attack.name]
    assert not isinstance(proc, subprocess.TimeoutExpired), f"hung for {TIMEOUT} s"
    assert proc.returncode == attack.status, (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    if attack.status not in (0, -9):
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{attack.command}: "), proc.stderr
        for word in attack.words:
            assert word.replace("{d}", str(d)) in lines[0], (word, lines[0])
    for folder in attack.guard:  # nothing lost, nothing half-written
        assert after[folder] == before[folder], (folder, before[folder], after[folder])
    if not attack.leftovers:  # no hidden staging folder anywhere in the scene
        assert not [p for p in d.rglob(".*") if p.name != ".lock"], sorted(d.rglob(".*"))
    if attack.command == "train" and attack.status != 0:
        assert not list((d / "run").glob("checkpoint_*.pt"))  # no run started from a bad directory
    if attack.after is not None:
        attack.after(d)


def test_the_campaign_is_large_enough():
    by_command = {c: sum(a.command == c for a in ATTACKS) for c in ("export", "train")}
    assert by_command["export"] >= 15 and by_command["train"] >= 25, by_command
    assert len({a.name for a in ATTACKS}) == len(ATTACKS)
