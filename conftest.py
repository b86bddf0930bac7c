"""
What the tests share: running the scripts as a user does, tiny datasets in the real on-disk format,
a stand-in `sonar` package that records how it was called, tiny models and language models. Offline.
The fast tests: `python -m pytest -q`; the end-to-end runs, marked slow: `python -m pytest -q -m
slow`.
"""
import json, os, subprocess, sys

import numpy as np
import pytest
import torch

from baselcm import LCMConfig
from checkpoints import build_model
from common import atomic_save
from datafiles import fit_normalizer, get_batch, load_split, sample_windows

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

def run(script, *args, cwd, env=None, check=True):
    cmd = script if isinstance(script, list) else [sys.executable, os.path.join(HERE, script)]
    p = subprocess.run(cmd + list(args), cwd=cwd, env=env or ENV, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} {args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p

def tiny_config(**kw):
    return LCMConfig(**{"d_emb": 16, "block_size": 12, "n_layer": 2, "n_head": 2, "n_embd": 32,
                        "dropout": 0.0} | kw)

def tiny_model(model_type="baselcm", **kw):
    return build_model(model_type, tiny_config(**kw).__dict__)

def train_toy(model, docs, steps=300, lr=3e-3, stop_head=True):
    """A few hundred AdamW steps on documents (a list of (n_i, d) tensors), in random windows as
    train.py draws them; the stop head learns from their ends unless stop_head is False."""
    rows = torch.cat(docs).numpy()
    offsets = np.cumsum([0] + [len(d) for d in docs])
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        starts, ends, first = sample_windows(rng, offsets, 32, model.config.block_size)
        x, y, mask, eot = get_batch(rows, starts, ends, first, model.config.block_size)
        model(x, y, mask, eot if stop_head else None)[1].backward()
        opt.step()
        opt.zero_grad()
    return offsets

def write_dataset(root, name, train_docs, val_docs, eot, encoder="stand-in"):
    """Writes documents (lists of (n_i, d) arrays, each ending with eot) in embed.py's format."""
    out = os.path.join(root, name)
    os.makedirs(out)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        np.concatenate(docs).astype(np.float16).tofile(os.path.join(out, f"{split}.bin"))
        np.save(os.path.join(out, f"{split}_offsets.npy"), np.cumsum([0] + [len(d) for d in docs]))
        with open(os.path.join(out, f"{split}.txt"), "w") as f:
            f.writelines(f"doc {i} sentence {j}\n" for i, d in enumerate(docs)
                         for j in range(len(d)))
    rows = np.concatenate(train_docs).astype(np.float16).astype(np.float32)
    center, scale = fit_normalizer(rows)
    meta = {"encoder": encoder, "d_emb": rows.shape[1], "lang": "eng_Latn", "dtype": "float16",
            "dataset": name, "key": name, "spacy_model": "", "max_chars": 256,
            "train_docs": len(train_docs), "val_docs": len(val_docs),
            "train_rows": len(rows), "val_rows": sum(map(len, val_docs)), "empty_docs_skipped": 0,
            "normalizer": {"center": center.tolist(), "scale": scale.tolist()},
            "mean": rows.mean(0).tolist(),
            "eot": eot.tolist()}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta

SONAR_DATA = {"encoder": "sonar", "lang": "eng_Latn", "d_emb": 1024, "eot": [0.0] * 1024,
              "spacy_model": "", "max_chars": 256, "dir": ""}

def save_checkpoint(out, model, data, model_type="baselcm"):
    os.makedirs(out, exist_ok=True)
    atomic_save({"model": model.state_dict(), "model_args": model.config.__dict__,
                 "config": {"model_type": model_type}, "data": data}, str(out / "ckpt.pt"))

def rotation_docs(rng, n_docs, d=16, lo=6, hi=20):
    """Documents whose next concept is a fixed rotation of the current one: learnable, and far from
    a copy."""
    rot, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))
    eot = np.full(d, 0.5, dtype=np.float32)
    docs = []
    for _ in range(n_docs):
        x = [rng.normal(size=d)]
        for _ in range(rng.integers(lo, hi) - 1):
            x.append(rot @ x[-1] + 0.05 * rng.normal(size=d))
        docs.append(np.vstack(x + [eot]).astype(np.float32))
    return docs, eot

@pytest.fixture(scope="module")
def rotation_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    train, eot = rotation_docs(rng, 200)
    val, _ = rotation_docs(rng, 20)
    write_dataset(root, "rot", train, val, eot)
    return root

FAKE_SONAR = '''
import json, os, time, zlib
import torch

def _log(call, **kw):
    with open(os.environ["FAKE_SONAR_LOG"], "a") as f:
        f.write(json.dumps({"call": call, **kw}) + "\\n")

def embed(sentence):  # deterministic, 1024-d like SONAR
    return torch.randn(1024, generator=torch.Generator().manual_seed(zlib.crc32(sentence.encode())))

class TextToEmbeddingModelPipeline:
    def __init__(self, encoder, tokenizer, device=None, dtype=None):
        _log("encoder_init", encoder=encoder, tokenizer=tokenizer, device=str(device), dtype=str(dtype))

    def predict(self, input, source_lang, batch_size=5, **kw):
        _log("encode", n=len(input), source_lang=source_lang, batch_size=batch_size)
        time.sleep(float(os.environ.get("FAKE_SONAR_DELAY", "0")))
        return torch.stack([embed(s) for s in input])

class EmbeddingToTextModelPipeline:
    def __init__(self, decoder, tokenizer, device=None, dtype=None):
        _log("decoder_init", decoder=decoder, tokenizer=tokenizer, device=str(device))

    def predict(self, inputs, target_lang, batch_size=5, max_seq_len=None, **kw):
        _log("decode", n=len(inputs), target_lang=target_lang, max_seq_len=max_seq_len)
        return [f"<{target_lang}> sentence {i}" for i in range(len(inputs))]
'''

@pytest.fixture()
def sonar_env(tmp_path):
    """An environment where `import sonar.inference_pipelines.text` finds the recording stand-in."""
    pkg = tmp_path / "fake" / "sonar" / "inference_pipelines"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "text.py").write_text(FAKE_SONAR)
    log = tmp_path / "sonar_calls.jsonl"
    env = dict(ENV, PYTHONPATH=str(tmp_path / "fake"), FAKE_SONAR_LOG=str(log))
    calls = lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return env, calls

def corpus(path, n_docs=12):
    lines = [" ".join(f"Document {i} says thing {j}   about topic {i % 3}." for j in range(2 + i % 4))
             for i in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path

def read_dataset(d):
    meta = json.load(open(d / "meta.json"))
    out = {"meta": meta}
    for s in ("train", "val"):
        rows, offsets, _ = load_split(str(d), s, meta)
        out[s] = (np.array(rows), offsets, (d / f"{s}.txt").read_text().splitlines())
    return out

@pytest.fixture(scope="module")
def tiny_lm():
    """A randomly initialised GPT-2 and a byte-level BPE tokenizer trained here in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The fire spread. Residents left.\nThe wind changed.\n"] * 20,
                            trainers.BpeTrainer(vocab_size=300,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=1024, n_embd=32,
                                    n_layer=2, n_head=2))
    return lm.eval(), PreTrainedTokenizerFast(tokenizer_object=tok)

# fp32: the same numbers on every CPU
TRAIN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=12", "--batch_size=8",
         "--eval_iters=4", "--log_interval=1", "--dtype=float32", "--dataset=rot"]

def log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]

def script_knobs(script):
    """A script's knobs and their defaults, read from its source: the module-level literals
    assigned before its configure() call."""
    import ast
    src = open(os.path.join(HERE, script)).read()
    # the statements before the line that calls configure
    tree = ast.parse(src[:src.rindex("\n", 0, src.index("configure(globals()"))])
    return {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Constant) for t in n.targets if isinstance(t, ast.Name)
            and isinstance(n.value.value, (int, float, bool, str))}

def resumes_exactly(model_type, data_root, cwd, *more):
    """Trains a tiny model_type 20 iterations in cwd/a, and 10 in cwd/b resumed to 20; asserts that b's
    losses and last evaluation are a's. -> the shared arguments (b holds the resumed run)."""
    args = [*TRAIN, f"--data_root={data_root}", f"--model_type={model_type}", "--eval_interval=10",
            "--dropout=0.1", "--lr_decay_iters=20", "--always_save_checkpoint=True", "--patience=0",
            "--eval_iters=2", *more]
    run("train.py", *args, "--max_iters=20", "--out_dir=a", cwd=cwd)
    run("train.py", *args, "--max_iters=10", "--out_dir=b", cwd=cwd)
    run("train.py", "--init_from=resume", "--out_dir=b", "--max_iters=20", cwd=cwd)
    losses = lambda out: {r["iter"]: r["loss"] for r in log_of(cwd / out) if "loss" in r}
    a, b = losses("a"), losses("b")
    assert sorted(b) == list(range(1, 21))
    assert all(abs(a[i] - b[i]) <= 1e-5 * abs(a[i]) for i in range(11, 21)), (a, b)
    # and evaluates what the unbroken run evaluates (with --ema: the same moving average)
    val = lambda out: [r["val"]["model"]["loss"] for r in log_of(cwd / out) if r["iter"] == 20 and "val" in r]
    assert abs(val("a")[0] - val("b")[0]) <= 1e-5 * val("a")[0]
    return args
