"""End-to-end checks of `python -m cs336_nb.export` in subprocesses; the conversion itself (logits, greedy
generation, tokenizer ids, load_hf_model, refusals) is tested in nbs/18_export.ipynb.

One module-scoped run directory is shared: a BPE tokenizer (vocab 300) trained by `train_bpe` on the
English corpus in nbs/data and saved in `<run>/tokenizer/`, and a tiny random model saved by
`save_checkpoint` with its config, as training leaves a run. Everything stays local: Hugging Face's
hub is switched off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE).
"""

import json
import os
import subprocess

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import pytest
import torch
from conftest import DATA, assert_one_line_error
from conftest import run_module as cli
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from cs336_nb.checkpoint import save_checkpoint
from cs336_nb.export import load_hf_model
from cs336_nb.export import main as export_main
from cs336_nb.generate import generate
from cs336_nb.model import TransformerLM
from cs336_nb.tokenizer import Tokenizer, train_bpe

TEXT = "the iron cement protects the ingot , naïve 🤖 <|endoftext|>def f(x):\n\treturn x  # done\n"


def assert_export_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert_one_line_error(proc, text, prog="export")


def tiny_model(**changes) -> TransformerLM:
    torch.manual_seed(0)
    config = dict(vocab_size=300, context_length=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, rope_theta=1e4)
    return TransformerLM.from_config(config | changes).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    tokenizer = Tokenizer(*train_bpe(DATA / "corpus.en", 300, ["<|endoftext|>"]), ["<|endoftext|>"])
    model = tiny_model(tie_embeddings=True)
    save_checkpoint(model, None, 4, root / "run" / "checkpoint_4.pt", config=model.config)
    tokenizer.save(root / "run" / "tokenizer")
    return root, model, tokenizer


def test_export_cli_loads_in_transformers(run):
    root, model, tokenizer = run
    proc = cli("export", root / "run", "--out", root / "hf")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint_4.pt" in proc.stdout
    written = {p.name for p in (root / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= written
    config = json.loads((root / "hf" / "config.json").read_text())
    assert (config["architectures"], config["max_position_embeddings"], config["tie_word_embeddings"]) == (
        ["LlamaForCausalLM"],
        64,
        True,
    )
    assert config["eos_token_id"] == tokenizer.special_to_id["<|endoftext|>"]

    hf_tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    ids = tokenizer.encode(TEXT)
    assert hf_tokenizer.encode(TEXT) == ids
    assert hf_tokenizer.decode(ids) == TEXT
    hf_model = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    with torch.no_grad():
        assert_close(hf_model(torch.tensor([ids])).logits, model(torch.tensor([ids])), rtol=0, atol=1e-4)

    # the pipeline a user calls: greedy text equals our greedy continuation, decoded
    prompt = "the iron"
    generator = pipeline("text-generation", model=str(root / "hf"), tokenizer=str(root / "hf"))
    text = generator(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    ours = generate(model, tokenizer.encode(prompt), 20, temperature=0, eos_id=config["eos_token_id"])
    assert text == prompt + tokenizer.decode(ours)


def test_export_cli_errors(run, capsys):
    """A refusal through the real command line; the other one-line errors in-process (no interpreter start-up)."""
    root, model, _ = run
    post = tiny_model(use_post_norm=True)
    save_checkpoint(post, None, 1, root / "post" / "checkpoint_1.pt", config=post.config)
    assert_export_error(cli("export", root / "post", "--out", root / "x"), "use_post_norm=True")

    silu = tiny_model(ffn_type="silu")
    save_checkpoint(silu, None, 1, root / "silu" / "checkpoint_1.pt", config=silu.config)
    save_checkpoint(model, None, 1, root / "no_tokenizer" / "checkpoint_1.pt", config=model.config)
    for argv, text in [
        ([root / "silu"], "ffn_type='silu'"),
        ([root / "nowhere"], "nowhere"),
        ([root / "no_tokenizer"], "--tokenizer"),
        ([root / "run", "--dtype", "int8"], "--dtype 'int8'"),
    ]:
        with pytest.raises(SystemExit) as exit:
            export_main([*map(str, argv), "--out", str(root / "x")])
        err = capsys.readouterr().err
        assert_export_error(subprocess.CompletedProcess([], exit.value.code, "", err), text)
    assert not (root / "x").exists()


def test_export_without_the_hf_extra(run):
    """`import cs336_nb` and training never import transformers; export without it is a one-line error."""
    root, _, _ = run
    block = "import sys\nfor name in ('transformers', 'safetensors', 'tokenizers'):\n    sys.modules[name] = None\n"
    imports = "import cs336_nb, cs336_nb.model, cs336_nb.train, cs336_nb.evaluate, cs336_nb.export\nprint('imported')\n"
    export = "cs336_nb.export.main(sys.argv[1:])\n"
    proc = cli("", root / "run", "--out", root / "no_hf", code=block + imports + export)
    assert proc.stdout.strip() == "imported", proc.stderr
    assert_export_error(proc, 'safetensors is not installed (pip install -e ".[hf]")')


def test_train_init_from_an_exported_model(run, tmp_path):
    # `train --init-from DIR` starts from the Hugging Face weights: with the learning rate still 0 at step 0
    # (one warm-up step), AdamW changes nothing, so checkpoint_1 must hold exactly the exported weights. Seed 1:
    # the exported model was drawn with seed 0, which a fresh run would reproduce.
    import numpy as np

    from cs336_nb.checkpoint import read_checkpoint

    root, model, _ = run
    hf_dir = root / "hf_for_train"
    export_main([str(root / "run"), "--out", str(hf_dir), "--overwrite"])
    tokens = np.random.default_rng(0).integers(0, 300, 5000).astype(np.uint16)
    np.save(tmp_path / "train.npy", tokens)
    shape = {k: v for k, v in model.config.items() if k != "tie_embeddings"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items() if not isinstance(v, bool)]
    common = [*flags, "--tie-embeddings", "--train-data", tmp_path / "train.npy", "--val-data", tmp_path / "train.npy"]
    common += ["--max-iters", 1, "--warmup-iters", 1, "--batch-size", 2, "--eval-iters", 1, "--threads", 1, "--seed", 1]
    started = cli("train", *common, "--init-from", hf_dir, "--checkpoint-dir", tmp_path / "a", timeout=180)
    assert started.returncode == 0, started.stderr
    fresh = cli("train", *common, "--checkpoint-dir", tmp_path / "b", timeout=180)  # the negative control
    assert fresh.returncode == 0, fresh.stderr
    expected = load_hf_model(hf_dir).state_dict()
    got = read_checkpoint(tmp_path / "a" / "checkpoint_1.pt")["model_state_dict"]
    other = read_checkpoint(tmp_path / "b" / "checkpoint_1.pt")["model_state_dict"]
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not torch.equal(other["layers.0.attn.q_proj.weight"], expected["layers.0.attn.q_proj.weight"])
