"""Tokenizer throughput on this machine: BPE training and encoding speed.

    python benchmarks/tokenizer.py            # everything
    python benchmarks/tokenizer.py --quick    # skip the 10 MB / 10,000-token training run

1. train_bpe on nbs/data/corpus.en, vocab 500
2. train_bpe on 10 MB of the standard-library corpus, vocab 10,000
3. Tokenizer.encode, default path, GPT-2 vocabulary (and tiktoken alone, and the pure-Python reference)
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from cs336_nb.prepare import stdlib_corpus
from cs336_nb.tokenizer import Tokenizer, train_bpe

DATA = Path(__file__).resolve().parents[1] / "nbs" / "data"


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the 10 MB training run")
    args = p.parse_args()
    corpus = DATA / "corpus.en"
    best, median = best_of(lambda: train_bpe(corpus, 500, ["<|endoftext|>"]), 5)
    print(f"train_bpe corpus.en vocab 500:        {best:6.2f} s (median {median:.2f} s)")
    if not args.quick:
        with tempfile.TemporaryDirectory() as d:
            train, _ = stdlib_corpus(d, "bench", max_bytes=10_800_000)  # ~5% goes to val: ~10 MB to train on
            mb = train.stat().st_size / 1e6
            t0 = time.perf_counter()
            train_bpe(train, 10_000, ["<|endoftext|>"])
            print(f"train_bpe stdlib {mb:.1f} MB vocab 10,000: {time.perf_counter() - t0:6.2f} s")
    tok = Tokenizer.from_files(DATA / "gpt2_vocab.json", DATA / "gpt2_merges.txt", ["<|endoftext|>"])
    text = corpus.read_text(encoding="utf-8") * 40  # ~5 MB
    mb = len(text.encode("utf-8")) / 1e6
    best, median = best_of(lambda: tok.encode(text), 3)
    print(f"encode ({tok.backend}), GPT-2 vocab:      {mb / best:6.1f} MB/s (median {mb / median:.1f})")
    raw, _ = best_of(lambda: tok._tiktoken.encode_ordinary(text), 3)  # the engine alone: how loaded the machine is
    print(f"  (tiktoken alone on the same text:       {mb / raw:6.1f} MB/s)")
    small = text[: len(text) // 10]
    best_ref, _ = best_of(
        lambda: Tokenizer(tok.vocab, tok.merges, ["<|endoftext|>"], backend="python").encode(small), 1
    )
    print(f"encode_reference (pure Python, cold cache): {mb / 10 / best_ref:6.1f} MB/s")


if __name__ == "__main__":
    main()
