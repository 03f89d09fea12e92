"""Tokenizer throughput on this machine: BPE training and encoding speed.

    python benchmarks/tokenizer.py            # everything below but the comparison
    python benchmarks/tokenizer.py --quick    # skip the 10 MB / 10,000-token training run
    python benchmarks/tokenizer.py --vs-hf    # only the comparison with Hugging Face tokenizers (several minutes)
    python benchmarks/tokenizer.py --vs-hf --mb 100 --vocab 10000 32000 --rounds 2

1. train_bpe on nbs/data/corpus.en, vocab 500
2. train_bpe on 10 MB of the standard-library corpus, vocab 10,000
3. Tokenizer.encode, default path, GPT-2 vocabulary (and tiktoken alone, and the pure-Python reference)
4. (--vs-hf) train_bpe against tokenizers' BpeTrainer on the same real text, paired: each run in its own
   child process, the two sides alternating, peak memory summed over the child and its workers
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "nbs" / "data"
EOT = "<|endoftext|>"


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _documents(root: Path, suffixes: tuple[str, ...]):
    """The UTF-8 text files under `root` (gzip-compressed ones unpacked), in a fixed order."""
    for folder, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_symlink() or not name.endswith(suffixes):
                continue
            try:
                raw = path.read_bytes()
                text = (gzip.decompress(raw) if name.endswith(".gz") else raw).decode("utf-8")
            except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError):
                continue
            if text.strip() and EOT not in text:
                yield text


def real_text(path: Path, n_bytes: int) -> int:
    """Write about `n_bytes` of this machine's text to `path`: Python sources, package docs, man pages, interleaved."""
    sources = [
        _documents(Path(sysconfig.get_paths()["purelib"]), (".py", ".txt", ".rst", ".md")),
        _documents(Path(sysconfig.get_paths()["stdlib"]), (".py", ".txt", ".rst")),
        _documents(Path("/usr/share/doc"), (".txt", ".md", ".rst", ".gz", "README", "copyright")),
        _documents(Path("/usr/share/man"), (".gz",)),
    ]
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for docs in zip_longest(*sources):
            for text in filter(None, docs):
                f.write(text + EOT)
                total += len(text.encode("utf-8")) + len(EOT)
            if total >= n_bytes:
                break
    return total


def train_hf(path: Path, vocab_size: int) -> list:
    """tokenizers' BpeTrainer set up as train_bpe: GPT-2's byte-level pre-tokeniser, all 256 bytes, one special token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's pattern
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,  # counts the 256 bytes and the special token, as train_bpe's does
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=0,
        show_progress=False,
    )
    tok.train([str(path)], trainer)
    return json.loads(tok.to_str())["model"]["merges"]


def child(side: str, path: Path, vocab_size: int) -> None:
    """Train once in this process and print the seconds it took and the number of merges, as JSON."""
    if side == "ours":
        from cs336_nb.tokenizer import train_bpe  # each side imports only what it needs: memory is measured

    t0 = time.perf_counter()
    merges = train_bpe(path, vocab_size, [EOT])[1] if side == "ours" else train_hf(path, vocab_size)
    print(json.dumps({"seconds": time.perf_counter() - t0, "merges": len(merges)}))


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += map(int, Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except (OSError, ValueError):
            pass
    return out


def _pss_mb(pids: list[int]) -> float:
    """Proportional set size of the processes, summed: memory shared after a fork counts once."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def measure(side: str, path: Path, vocab_size: int) -> dict:
    """Run `child` in a fresh process; add its peak memory (sampled every 20 ms over the process tree)."""
    cmd = [sys.executable, __file__, "--child", side, str(path), str(vocab_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _pss_mb(_tree(proc.pid)))
        time.sleep(0.02)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{side} failed with status {proc.returncode}")
    return {**json.loads(out), "peak_mb": peak}


def load() -> str:
    """The 1-minute load average, and the cores it is shared by."""
    return f"{os.getloadavg()[0]:.1f}/{os.cpu_count()}"


def versus_hf(mb: float, vocab_sizes: list[int], rounds: int) -> None:
    """Paired runs of train_bpe and tokenizers' trainer on the same text; print each pair and the median ratios."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "real_text.txt"
        size = real_text(path, int(mb * 1e6))
        print(f"real text: {size / 1e6:.1f} MB (Python sources, /usr/share/doc, man pages); {os.cpu_count()} cores")
        print("| vocab | round | ours s | HF s | time ratio | ours MB | HF MB | memory ratio | load before/after |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for vocab_size in vocab_sizes:
            ratios = []
            for r in range(rounds):
                before = load()
                order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")  # alternate who goes first
                res = {side: measure(side, path, vocab_size) for side in order}
                ours, hf = res["ours"], res["hf"]
                ratios.append((ours["seconds"] / hf["seconds"], ours["peak_mb"] / hf["peak_mb"]))
                print(
                    f"| {vocab_size:,} | {r + 1} | {ours['seconds']:.1f} | {hf['seconds']:.1f} | {ratios[-1][0]:.2f} "
                    f"| {ours['peak_mb']:.0f} | {hf['peak_mb']:.0f} | {ratios[-1][1]:.2f} | {before} / {load()} |",
                    flush=True,
                )
                if ours["merges"] != hf["merges"]:
                    print(f"  (merges: ours {ours['merges']}, HF {hf['merges']})")
            t, m = (statistics.median(x) for x in zip(*ratios))
            print(f"vocab {vocab_size:,}: median time ratio {t:.2f}, median memory ratio {m:.2f} (ours / HF)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the 10 MB training run")
    p.add_argument("--vs-hf", action="store_true", help="only compare BPE training with Hugging Face tokenizers")
    p.add_argument("--mb", type=float, default=100, help="size of the real text for --vs-hf, in MB")
    p.add_argument("--vocab", type=int, nargs="+", default=[10_000, 32_000], help="vocabulary sizes for --vs-hf")
    p.add_argument("--rounds", type=int, default=2, help="paired runs per vocabulary size for --vs-hf")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "PATH", "VOCAB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), int(args.child[2]))
    if args.vs_hf:
        return versus_hf(args.mb, args.vocab, args.rounds)
    from cs336_nb.prepare import stdlib_corpus
    from cs336_nb.tokenizer import Tokenizer, train_bpe

    corpus = DATA / "corpus.en"
    best, median = best_of(lambda: train_bpe(corpus, 500, [EOT]), 5)
    print(f"train_bpe corpus.en vocab 500:        {best:6.2f} s (median {median:.2f} s)")
    if not args.quick:
        with tempfile.TemporaryDirectory() as d:
            train, _ = stdlib_corpus(d, "bench", max_bytes=10_800_000)  # ~5% goes to val: ~10 MB to train on
            mb = train.stat().st_size / 1e6
            t0 = time.perf_counter()
            train_bpe(train, 10_000, [EOT])
            print(f"train_bpe stdlib {mb:.1f} MB vocab 10,000: {time.perf_counter() - t0:6.2f} s")
    tok = Tokenizer.from_files(DATA / "gpt2_vocab.json", DATA / "gpt2_merges.txt", [EOT])
    text = corpus.read_text(encoding="utf-8") * 40  # ~5 MB
    mb = len(text.encode("utf-8")) / 1e6
    best, median = best_of(lambda: tok.encode(text), 3)
    print(f"encode ({tok.backend}), GPT-2 vocab:      {mb / best:6.1f} MB/s (median {mb / median:.1f})")
    raw, _ = best_of(lambda: tok._tiktoken.encode_ordinary(text), 3)  # the engine alone: how loaded the machine is
    print(f"  (tiktoken alone on the same text:       {mb / raw:6.1f} MB/s)")
    small = text[: len(text) // 10]
    best_ref, _ = best_of(lambda: Tokenizer(tok.vocab, tok.merges, [EOT], backend="python").encode(small), 1)
    print(f"encode_reference (pure Python, cold cache): {mb / 10 / best_ref:6.1f} MB/s")


if __name__ == "__main__":
    main()
