"""
The specification of baselcm, as tests. Offline: tiny datasets in the real on-disk format, a stand-in
`sonar` package that records how it was called, and the real MiniLM encoder on a small slice.
$ python -m pytest -q
"""
import copy, json, os, signal, subprocess, sys, time

import numpy as np
import pytest
import torch

import baselcm, common, concepts, datafiles, diffusion, metrics
from baselcm import BaseLCM, LCMConfig
from diffusion import DiffusionConfig, DiffusionLCM
from datafiles import fit_normalizer, get_batch, sample_windows
from metrics import concept_metrics, finish_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

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

def write_dataset(root, name, train_docs, val_docs, eot, encoder="stand-in"):
    """Writes documents (lists of (n_i, d) arrays, each ending with eot) in embed.py's format."""
    out = os.path.join(root, name)
    os.makedirs(out)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        np.concatenate(docs).astype(np.float16).tofile(os.path.join(out, f"{split}.bin"))
        np.save(os.path.join(out, f"{split}_offsets.npy"), np.cumsum([0] + [len(d) for d in docs]))
        with open(os.path.join(out, f"{split}.txt"), "w") as f:
            f.writelines(f"doc {i} sentence {j}\n" for i, d in enumerate(docs) for j in range(len(d)))
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

def save_checkpoint(out, model, data):
    os.makedirs(out, exist_ok=True)
    common.atomic_save({"model": model.state_dict(), "model_args": model.config.__dict__,
                        "config": {}, "data": data},
                        str(out / "ckpt.pt"))

def rotation_docs(rng, n_docs, d=16, lo=6, hi=20):
    """Documents whose next concept is a fixed rotation of the current one: learnable, and far from a copy."""
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
        rows, offsets, _ = datafiles.load_split(str(d), s, meta)
        out[s] = (np.array(rows), offsets, (d / f"{s}.txt").read_text().splitlines())
    return out

# -----------------------------------------------------------------------------
# the model

def test_prediction_at_t_ignores_later_concepts():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    x = torch.randn(2, 12, 16)
    changed = x.clone()
    changed[:, 7:] = torch.randn(2, 5, 16)
    a, _ = model(x)
    b, _ = model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)

def test_loss_is_squared_error_against_normalized_next_concept_summed_over_dims():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    model.normalizer.center.uniform_(-1, 1)
    model.normalizer.scale.uniform_(0.5, 2)
    x, y = torch.randn(3, 12, 16), torch.randn(3, 12, 16)
    pred, loss = model(x, y)
    expected = ((pred - (y - model.normalizer.center) / model.normalizer.scale) ** 2).sum(-1).mean()
    assert torch.allclose(loss, expected)

def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    doc = torch.randn(1, 6, 16)  # 5 inputs, 5 targets
    _, short = model(doc[:, :-1], doc[:, 1:])
    padded = torch.cat([doc, torch.randn(1, 7, 16) * 100], 1)  # garbage after the document
    mask = torch.arange(12)[None] < 5
    _, long = model(padded[:, :-1], padded[:, 1:], mask)
    assert torch.allclose(short, long, atol=1e-5)

def test_batches_never_cross_documents():
    offsets = np.cumsum([0, 3, 1 + 1, 40, 7, 2, 25])
    # row = its doc id
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)).astype(np.float32)[:, None]
    rng = np.random.default_rng(0)
    starts, ends, first = sample_windows(rng, offsets, 500, 8)
    x, y, mask = get_batch(rows, starts, ends, first, 8)
    doc_of_start = rows[starts, 0]
    for i in range(500):
        real = mask[i]
        assert real.any()
        assert (x[i, :, 0][real] == doc_of_start[i]).all()
        assert (y[i, :, 0][real] == doc_of_start[i]).all()
    assert mask.sum(1).max() == 8  # long documents fill the window

def test_on_pairs_the_loss_covers_the_answers_only():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 30, 40)  # prompt, answer and end of text
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts_of_answers = offsets[:-1] + lengths - rng.integers(2, 5, 40)
    rows = rng.normal(size=(offsets[-1], 16)).astype(np.float32)
    starts, ends, first = sample_windows(rng, offsets, 64, 12, starts_of_answers)
    doc = np.searchsorted(offsets, starts, side="right") - 1
    # each window ends with its document's end of text and predicts its answer
    assert np.array_equal(ends, offsets[doc + 1]) and np.all(ends - starts <= 13)
    x, y, mask = get_batch(rows, starts, ends, first, 12)
    target_rows = starts[:, None] + 1 + np.arange(12)
    assert np.array_equal(mask.numpy(), (target_rows >= starts_of_answers[doc][:, None])
                          & (target_rows < ends[:, None]))
    assert mask.sum() == datafiles.count_targets(starts, ends, first, 12) > 0
    model = BaseLCM(tiny_config())
    _, loss = model(x, y, mask)
    prompt_targets = y.clone()
    prompt_targets[~mask] += torch.randn(int((~mask).sum()), 16)
    assert torch.equal(model(x, prompt_targets, mask)[1], loss)
    answer_targets = y.clone()
    answer_targets[mask] += 1.0
    assert model(x, answer_targets, mask)[1] > loss

def test_normalizer_uses_true_median_and_quartiles():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(20000, 4)).astype(np.float32)
    center, scale = fit_normalizer(x)
    assert np.allclose(center, np.median(x, 0), atol=1e-5)
    assert np.allclose(scale,
                       (np.quantile(x, 0.75, 0) - np.quantile(x, 0.25, 0)) / 1.349, atol=1e-5)
    assert np.allclose(scale, 2.0, atol=0.1)  # the IQR of a normal / 1.349 is its std
    norm = baselcm.Normalizer(4)
    norm.center.copy_(torch.from_numpy(center)), norm.scale.copy_(torch.from_numpy(scale))
    t = torch.from_numpy(x[:100])
    assert torch.allclose(norm.denormalize(norm.normalize(t)), t, atol=1e-5)

def window_ids(B, T):  # each window its own document, targets at rows 1..T
    return torch.arange(B), torch.arange(1, T + 1).expand(B, T)

def test_metrics_on_perfect_copy_and_mean_predictors():
    torch.manual_seed(0)
    norm = baselcm.Normalizer(16)
    seq = torch.randn(4, 9, 16)
    x, y, mask = seq[:, :-1], seq[:, 1:], torch.ones(4, 8, dtype=torch.bool)
    perfect = finish_metrics(concept_metrics(y, x, y, mask, norm, *window_ids(4, 8)))
    copy = finish_metrics(concept_metrics(x, x, y, mask, norm, *window_ids(4, 8)))
    assert perfect["l2"] < 1e-6 and perfect["loss"] < 1e-9
    assert perfect["ca"] == perfect["ca_doc"] == 1.0
    # a copy is as close to its context as can be
    assert abs(perfect["par"] - 1) < 1e-6 and copy["par"] > 1
    mean = finish_metrics(concept_metrics(torch.zeros_like(y), x, y, mask, norm, *window_ids(4, 8)))
    # one prediction for all: of each pair of targets, it is closer to exactly one
    assert mean["ca_doc"] == 0.5

def test_contrastive_accuracy_leaves_out_the_truth_and_its_neighbours_in_the_document():
    line = lambda *v: torch.tensor([[[a, 1.0] for a in v]])  # points on a line: distances by hand
    # window 0: document 0, rows 1-3; window 1: document 1, rows 0-2
    y = torch.cat([line(1, 2, 3), line(10, 20, 30)])
    pred = torch.cat([line(1.4, 2.9, 1.2), line(10, 20, 30)])
    mask = torch.ones(2, 3, dtype=torch.bool)
    doc = torch.tensor([0, 1])
    row = torch.tensor([[1, 2, 3], [0, 1, 2]])
    r = finish_metrics(concept_metrics(pred, y, y, mask, baselcm.Normalizer(2), doc, row))
    # 1.4 vs 1: all 4 distractors (3, 10, 20, 30) further; 2.9 vs 2: its neighbours 1 and 3 are left out, 3 of 3;
    # 1.2 vs 3: 1 (not a neighbour) is closer, 3 of 4; window 1 is exact: 4 + 3 + 4 hits. The official variant
    # takes only the other document's 3 targets: 18 of 18.
    assert r["ca"] == 21 / 22 and r["ca_doc"] == 1.0

def test_par_is_the_max_cosine_to_the_context_of_prediction_over_truth():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # the context grows: [x0], then [x0, x1]
    y = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # max cos to the context: 1/sqrt(2) both times
    pred = torch.tensor([[[1.0, 0.0], [3.0, 1.0]]])  # max cos: 1, then 3/sqrt(10)
    r = finish_metrics(concept_metrics(pred, x, y, torch.ones(1, 2, dtype=torch.bool),
                                       baselcm.Normalizer(2), *window_ids(1, 2)))
    assert abs(r["par"] - (1 + 3 / 10 ** 0.5) / (2 / 2 ** 0.5)) < 1e-6

@pytest.fixture(scope="module")
def tiny_lm():
    """A randomly initialised GPT-2 and a byte-level BPE tokenizer trained here in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["The fire spread. Residents left.\nThe wind changed.\n"] * 20,
                            trainers.BpeTrainer(vocab_size=300,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=1024, n_embd=32,
                                    n_layer=2, n_head=2))
    return lm.eval(), PreTrainedTokenizerFast(tokenizer_object=tok)

def test_mi_is_the_gain_in_mean_log_likelihood_from_the_context(tiny_lm):
    lm, tok = tiny_lm
    texts = ["The wind changed.", "Residents left."]
    contexts = [["The fire spread.", "Residents left."], []]
    gain, n = metrics.coherence_mi(lm, tok, texts, contexts)
    def mean_nll(prefix, text):  # transformers' own loss over the text's tokens only
        p, t = tok.encode(prefix), tok.encode(text + "\n")
        return lm(torch.tensor([p + t]),
                  labels=torch.tensor([[-100] * len(p) + t])).loss.item(), len(t)
    by_hand = [(mean_nll("\n", s)[0] - mean_nll("\n" + "".join(c + "\n" for c in ctx), s)[0],
                mean_nll("\n", s)[1])
               for s, ctx in zip(texts, contexts)]
    assert n == sum(k for _, k in by_hand) and abs(gain - sum(d * k for d, k in by_hand)) < 1e-4
    # no context, no gain; a context changes the likelihood
    assert abs(by_hand[1][0]) < 1e-6 and abs(gain) > 1e-3
    lm = copy.deepcopy(lm)  # the fixture is shared
    with torch.no_grad():  # a model that sees only the current token: a context can change nothing
        for block in lm.transformer.h:
            block.attn.c_proj.weight.zero_(), block.attn.c_proj.bias.zero_()
        lm.transformer.wpe.weight.zero_()
    assert abs(metrics.coherence_mi(lm, tok, texts, contexts)[0]) < 1e-4

# -----------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("compiled", [False, True])
def test_cached_generation_equals_uncached_across_the_context_crop(compiled):
    torch.manual_seed(0)
    model = BaseLCM(tiny_config(block_size=8)).eval()
    prompt, eot = torch.randn(3, 16), torch.randn(16)
    b, cos_b, _ = model.generate(prompt, 30, eot, stop_eot=2.0, use_cache=False)
    if compiled:  # sample.py --compile=True
        torch._dynamo.reset()
        model.compile()
    a, cos_a, _ = model.generate(prompt, 30, eot, stop_eot=2.0, use_cache=True)
    assert a.shape == (30, 16)  # 3 + 30 concepts: the 8-concept window was cut several times
    assert torch.allclose(a, b, atol=1e-4) and np.allclose(cos_a, cos_b, atol=1e-4)
    # the prompt's prefill, the one-concept step, the prefill after a cut: not one graph per position
    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3

def test_generation_stops_at_end_of_text_on_repeat_and_at_max():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    prompt = torch.randn(2, 16)
    first = model.generate(prompt, 1, torch.randn(16), stop_eot=2.0)[0][0]
    # eot == the first prediction
    new, cos, reason = model.generate(prompt, 10, first.clone(), stop_eot=0.9)
    assert reason == "eot" and len(new) == 1 and cos[0] > 0.999
    with torch.no_grad():  # a model that always predicts its input's normalized value: a repeat
        for p in model.parameters():
            p.zero_()
        model.postnet.bias.copy_(model.normalizer.normalize(prompt[-1]))
    new, _, reason = model.generate(prompt, 10, -prompt[-1], stop_eot=0.9, stop_repeat=0.9)
    assert reason == "repeat" and len(new) == 1
    new, _, reason = model.generate(prompt, 5, -prompt[-1], stop_eot=0.9)
    assert reason == "max_new_concepts" and len(new) == 5

def test_noise_gives_varied_samples_and_none_is_deterministic():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    prompt, eot = torch.randn(2, 16), torch.randn(16)
    g = torch.Generator().manual_seed(1)
    a, b = (model.generate(prompt, 4, eot, stop_eot=2.0, noise=0.5,
                           generator=g)[0] for _ in range(2))
    c, d = (model.generate(prompt, 4, eot, stop_eot=2.0)[0] for _ in range(2))
    assert not torch.allclose(a, b) and torch.equal(c, d)

# -----------------------------------------------------------------------------
# the diffusion LCM

def tiny_diffusion(**kw):
    return DiffusionLCM(DiffusionConfig(**tiny_config(**kw).__dict__))

def test_a_noisy_concept_sees_neither_its_clean_target_nor_later_concepts_nor_other_noisy_ones():
    torch.manual_seed(0)
    model = tiny_diffusion().eval()
    B, T, k = 2, 10, 4
    concepts, noisy = torch.randn(B, T, 16), torch.randn(B, T, 16)
    t = torch.randint(0, 100, (B, T))
    cond = torch.zeros(B, T, dtype=torch.bool)
    with torch.no_grad():
        pred = model.denoise(concepts, noisy, t, cond)
        # position k denoises the concept after c_k: c_{k+1} on is its target and the future
        later = concepts.clone()
        later[:, k + 1:] += torch.randn(B, T - k - 1, 16)
        other = noisy.clone()
        other[:, torch.arange(T) != k] += torch.randn(B, T - 1, 16)
        assert torch.allclose(model.denoise(later, noisy, t, cond)[:, :k + 1], pred[:, :k + 1], atol=1e-5)
        assert torch.allclose(model.denoise(concepts, other, t, cond)[:, k], pred[:, k], atol=1e-5)
        # the context does reach it, unless it is unconditional (guidance)
        earlier = concepts.clone()
        earlier[:, :k + 1] += torch.randn(B, k + 1, 16)
        assert not torch.allclose(model.denoise(earlier, noisy, t, cond)[:, k], pred[:, k], atol=1e-3)
        free = cond.clone()
        free[:, k] = True
        alone = model.denoise(concepts, noisy, t, free)[:, k]
        assert torch.allclose(model.denoise(earlier, noisy, t, free)[:, k], alone, atol=1e-5)

def test_the_schedule_goes_from_almost_clean_to_pure_noise():
    alpha_bar = diffusion.cosine_schedule(100)
    assert alpha_bar.shape == (100,) and alpha_bar[-1] == 0  # zero terminal SNR
    assert alpha_bar[0] > 0.999 and (alpha_bar[1:] < alpha_bar[:-1]).all()

def test_ddim_with_guidance_1_equals_sampling_without_guidance():
    torch.manual_seed(0)
    model = tiny_diffusion().eval()
    model.config.guidance, model.config.ddim_steps = 1.0, 8
    concepts = torch.randn(3, 7, 16)
    sampled = model.predict(concepts, generator=torch.Generator().manual_seed(5))
    # DDIM written out on the training path's denoiser, the conditional half only
    z = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(5)) * model.config.init_noise
    steps = [99, 87, 74, 61, 49, 37, 24, 11]  # "trailing" (diffusers): 8 of 100, the first pure noise
    with torch.no_grad():
        for t, t_next in zip(steps, steps[1:] + [None]):
            x0 = model.denoise(concepts, z, torch.full((3, 7), t), torch.zeros(3, 7, dtype=torch.bool))
            a = model.alpha_bar[t]
            a_next = model.alpha_bar[t_next] if t_next is not None else torch.tensor(1.0)
            z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * (z - a.sqrt() * x0) / (1 - a).sqrt()
    assert torch.allclose(sampled, z, atol=1e-5)
    # generate samples after the last position only, from the same starting noise
    last = model.predict(concepts, pos=torch.arange(7), generator=torch.Generator().manual_seed(5))
    assert last.shape == (3, 1, 16)

def test_where_two_next_concepts_are_equally_likely_diffusion_samples_one_and_mse_predicts_the_mean():
    """The paper's argument for the diffusion LCM in one test: after the same context, A or B."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    a, b = torch.tensor(rng.normal(size=(2, 16)), dtype=torch.float32) * 2
    start = torch.tensor(rng.normal(size=16), dtype=torch.float32)
    models = {"mse": BaseLCM(tiny_config(block_size=2)), "diffusion": tiny_diffusion(block_size=2)}
    for model in models.values():
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(400):
            nxt = torch.where(torch.rand(64, 1) < 0.5, a, b)
            docs = torch.stack([start.expand(64, 16), nxt], 1)  # (64, 2, 16): start, then A or B
            _, loss = model(docs[:, :1], docs[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    context = start.expand(200, 1, 16)
    mean = models["mse"].normalizer.denormalize(models["mse"].predict(context)[0, 0])
    assert torch.dist(mean, (a + b) / 2) < 0.1 * torch.dist(a, b)
    sampled = models["diffusion"].predict(context, generator=torch.Generator().manual_seed(0))
    samples = models["diffusion"].normalizer.denormalize(sampled[:, 0])
    to_a, to_b = (samples - a).norm(dim=-1), (samples - b).norm(dim=-1)
    near = torch.minimum(to_a, to_b) < 0.25 * torch.dist(a, b)
    assert near.float().mean() > 0.9  # each sample lands by A or by B, not between them
    assert 0.2 < (to_a < to_b).float().mean() < 0.8  # and both appear

def test_retrieval_returns_the_exact_sentence_of_a_bank_embedding(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(5, 16)).astype(np.float32) for _ in range(6)]
    meta = write_dataset(tmp_path, "bank", docs[:4], docs[4:], docs[0][-1])
    # multi-byte: lines are found by their bytes
    lines = [f"документ {i // 5}, 文 {i % 5}." for i in range(20)]
    (tmp_path / "bank" / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    bank = concepts.SentenceBank(str(tmp_path / "bank"), meta)
    # chunks smaller than the bank
    idx, cos = bank.nearest(np.stack([docs[2][3], docs[1][0]]), chunk=7)
    # the nearest of each query
    idx = idx[:, 0]
    assert list(idx) == [13, 5] and np.all(cos > 0.999)
    assert bank.texts([*idx, 0, 19]) == [lines[13], lines[5], lines[0], lines[19]]

def test_retrieval_never_repeats_a_sentence_nor_returns_end_of_text(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(5, 16)).astype(np.float32) for _ in range(6)]
    eot = rng.normal(size=16).astype(np.float32)
    for d in docs:
        d[-1] = eot
    meta = write_dataset(tmp_path, "bank", docs[:4], docs[4:], eot)
    bank = concepts.SentenceBank(str(tmp_path / "bank"), meta)
    # five times the same concept, and end of text itself
    queries = torch.tensor(np.stack([docs[1][2]] * 5 + [eot]))
    texts, cos, rows = bank.decode(queries, avoid=["doc 1 sentence 2"])
    assert len(set(texts)) == 6 and "doc 1 sentence 2" not in texts
    assert all(not t.endswith("sentence 4") for t in texts)
    # each text comes with its own row
    lines = (tmp_path / "bank" / "train.txt").read_text().splitlines()
    train = np.concatenate(docs[:4]).astype(np.float16).astype(np.float32)
    assert all(np.array_equal(rows[i], train[lines.index(t)]) for i, t in enumerate(texts))
    texts, _, _ = bank.decode(queries[:5], repeats=True)
    assert texts == ["doc 1 sentence 2"] * 5

def test_generation_feeds_back_what_feed_returns_and_raw_feedback_appends_the_predictions():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    prompt, eot = torch.randn(3, 16), torch.randn(16)
    decoded = torch.randn(4, 16)
    seen = []

    def feed(z):
        seen.append(z)
        return decoded[len(seen) - 1]
    new, _, _ = model.generate(prompt, 4, eot, stop_eot=2.0, stop_repeat=0.0, feed=feed)
    assert torch.equal(new, decoded)
    # each prediction came from the context of the fed-back concepts, not of the raw ones
    with torch.no_grad():
        for i, z in enumerate(seen):
            pred = model(torch.cat([prompt, decoded[:i]])[None])[0][0, -1]
            assert torch.allclose(z, model.normalizer.denormalize(pred), atol=1e-5)
    # raw: each prediction is appended as it is, as a loop over the whole window computes it
    new, _, _ = model.generate(prompt, 4, eot, stop_eot=2.0, stop_repeat=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model.normalizer.denormalize(model(seq[None])[0][0, -1])[None]])
    assert torch.allclose(new, seq[3:], atol=1e-5)

def test_closeness_is_the_mean_of_each_generated_concepts_best_cosine_to_the_real_ones():
    generated = [[1.0, 0.0], [0.0, 2.0]]
    real = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert abs(metrics.closeness(generated, real) - (1 + 0.5 ** 0.5) / 2) < 1e-6

def test_answers_are_scored_by_rouge_against_lead_k_a_random_answer_and_the_decoders_best():
    texts = ["P1 alpha beta.", "P2 gamma delta.", "[MODEL]:", "The cat sat on the mat.", concepts.EOT_TEXT]
    rows = np.eye(5, 4, dtype=np.float32)
    said = {False: "The cat sat.", None: "The cat sat on a mat."}

    class Model:  # generates one concept, then stops
        config = tiny_config(block_size=8)

        def generate(self, prompt, n, eot, stop_eot, stop_repeat, feed):
            assert torch.equal(prompt, torch.as_tensor(rows[:3]))
            feed(torch.ones(4))
    decoders = lambda repeats: lambda c, avoid=(), back=False: ([said[repeats]] * len(c), [None],
                                                                np.zeros((len(c), 4)))
    train_texts = ["Q1.", "[MODEL]:", "A dog ran.", concepts.EOT_TEXT]
    r = metrics.answers(Model(), rows, np.array([0, 5]), np.array([3]), texts, torch.zeros(4), decoders,
                        train_texts, np.array([0, 4]), np.array([2]), prompt_end="[MODEL]:")
    # by hand: reference "the cat sat on the mat", 6 tokens
    assert r["pairs"] == 1
    assert np.allclose([r["model"][m] for m in ("rouge1", "rouge2", "rougeL", "sentences")],
                       [2 / 3, 4 / 7, 2 / 3, 1])
    assert np.allclose([r["decoder's best"][m] for m in ("rouge1", "rouge2", "rougeL")], [5 / 6, 3 / 5, 5 / 6])
    # lead-1 (the references' mean length): "P1 alpha beta."; the random answer: "A dog ran."
    assert r["lead-1"]["rouge1"] == 0 and r["lead-1"]["sentences"] == 1
    assert r["random answer"]["rouge1"] == 0 and r["random answer"]["sentences"] == 1

def test_the_continuation_metric_stops_as_sample_py_does_by_default():
    import inspect
    defaults = inspect.signature(metrics.continuations).parameters
    knobs = {k: v for k, v in script_knobs("sample.py").items() if k.startswith("stop_")}
    assert knobs == {k: defaults[k].default for k in ("stop_eot", "stop_repeat")}

# -----------------------------------------------------------------------------
# checkpoints

def test_failed_checkpoint_write_leaves_the_previous_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.atomic_save({"iter_num": 1}, path)
    real_save = torch.save

    def crash(obj, f):
        real_save({"half": "written"}, f)
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        common.atomic_save({"iter_num": 2}, path)
    assert torch.load(path)["iter_num"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]

def test_checkpoint_of_a_compiled_model_loads(tmp_path):
    model = BaseLCM(tiny_config())
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    common.atomic_save({"model": compiled.state_dict(), "model_args": model.config.__dict__,
                        "config": {}, "data": {}},
                        tmp_path / "c.pt")
    loaded, _ = common.load_checkpoint(str(tmp_path / "c.pt"))
    x = torch.randn(1, 5, 16)
    assert torch.equal(loaded.eval()(x)[0], model.eval()(x)[0])

# -----------------------------------------------------------------------------
# training (train.py as a user runs it)

# fp32: the same numbers on every CPU
TRAIN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=12", "--batch_size=8",
         "--eval_iters=4", "--log_interval=1", "--dtype=float32", "--dataset=rot"]

def log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]

def test_training_learns_a_next_concept_rule_far_better_than_copying(rotation_data, tmp_path):
    out = tmp_path / "out"
    run("train.py", f"--data_root={rotation_data}", f"--out_dir={out}", "--max_iters=150",
        "--eval_interval=150", "--n_embd=64", "--batch_size=16", "--learning_rate=2e-3",
        "--dropout=0.0", *TRAIN[5:], cwd=tmp_path)
    first, last = [r["val"] for r in log_of(out) if "val" in r]
    assert last["model"]["loss"] < 0.3 * last["copy"]["loss"]
    assert last["model"]["loss"] < 0.3 * last["mean"]["loss"]
    assert last["model"]["loss"] < 0.3 * first["model"]["loss"]

def test_a_killed_run_resumed_with_only_init_from_and_out_dir_continues_exactly(rotation_data, tmp_path):
    common = [*TRAIN, f"--data_root={rotation_data}", "--eval_interval=10", "--max_iters=400",
              "--dropout=0.1", "--always_save_checkpoint=True", "--learning_rate=1e-3", "--patience=0"]
    run("train.py", *common, "--out_dir=a", cwd=tmp_path)
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *common, "--out_dir=b"],
                         cwd=tmp_path, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = tmp_path / "b" / "log.jsonl", time.time() + 120
    evaluated = lambda: log.exists() and any("val" in r and r["iter"] >= 30 for r in log_of(log.parent))
    while time.time() < deadline and not evaluated():
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert max(r["iter"] for r in log_of(log.parent)) < 400  # really interrupted
    # data_root, lr, max_iters: the checkpoint's
    run("train.py", "--init_from=resume", "--out_dir=b", cwd=tmp_path)
    losses = lambda out: {r["iter"]: r["loss"] for r in log_of(tmp_path / out) if "loss" in r}
    a, b = losses("a"), losses("b")
    assert sorted(b) == list(range(1, 401))
    assert all(abs(a[i] - b[i]) <= 1e-5 * abs(a[i]) for i in range(1, 401)), (a, b)

def test_training_length_follows_the_data_and_stops_when_val_loss_stops_improving(rotation_data, tmp_path):
    rows = json.load(open(rotation_data / "rot" / "meta.json"))["train_rows"]
    p = run("train.py", *TRAIN, f"--data_root={rotation_data}", "--out_dir=e", "--epochs=0.5",
            cwd=tmp_path)
    # half a pass over the training concepts, in batches of 8 windows of 12
    n = -(-rows // (2 * 8 * 12))
    assert f"{n} iterations (0.5 epochs)" in p.stdout
    assert max(r["iter"] for r in log_of(tmp_path / "e")) == n
    # nothing learns: the evaluations at 10 and 15 are no better than at 5
    p = run("train.py", *TRAIN, f"--data_root={rotation_data}", "--out_dir=s", "--learning_rate=0",
            "--eval_interval=5", "--patience=2", cwd=tmp_path)
    assert "no better val loss in 2 evaluations: stopping" in p.stdout
    assert max(r["iter"] for r in log_of(tmp_path / "s")) == 15

@pytest.fixture()
def trained(tmp_path):
    """A tiny model trained on data/rot, and beside it: rot2 (same encoder), wide (another d_emb)."""
    rng = np.random.default_rng(2)
    for name, d in (("rot", 16), ("rot2", 16), ("wide", 24)):
        train, eot = rotation_docs(rng, 30, d=d)
        val, _ = rotation_docs(rng, 6, d=d)
        write_dataset(tmp_path / "data", name, train, val, eot)
    run("train.py", *TRAIN, "--out_dir=o", "--max_iters=10", "--eval_interval=5",
        "--learning_rate=1e-3", cwd=tmp_path)
    return tmp_path

def test_resume_and_eval_only_follow_the_checkpoint_and_print_what_changed(trained):
    # data/lee does not exist here
    p = run("train.py", "--init_from=resume", "--out_dir=o", "--max_iters=20", cwd=trained)
    assert "changed from the checkpoint: max_iters 10 -> 20" in p.stdout
    assert max(r["iter"] for r in log_of(trained / "o")) == 20
    assert max(r.get("lr", 0) for r in log_of(trained / "o")) > 4e-4
    run("train.py", "--eval_only=True", "--out_dir=o", cwd=trained)
    assert json.load(open(trained / "o" / "eval.json"))["dataset"] == os.path.join("data", "rot")
    # same encoder: allowed if asked
    p = run("train.py", "--eval_only=True", "--out_dir=o", "--dataset=rot2", cwd=trained)
    assert f"trained on {trained / 'data' / 'rot'}" in p.stdout
    assert json.load(open(trained / "o" / "eval.json"))["dataset"] == os.path.join("data", "rot2")

@pytest.mark.parametrize("args, message", [
    (["--init_from=resume", "--n_layer=3"], "the model's settings cannot change"),
    (["--init_from=resume", "--dropout=0.2"], "the model's settings cannot change"),
    (["--eval_only=True", "--dataset=wide"],
     "holds stand-in concepts (d_emb 24), but o/ckpt.pt was trained on"),
    (["--init_from=resume", "rebuilt"],
     "was rebuilt after o/ckpt.pt was trained on it: pass --dataset=rot"),
])
def test_resume_refuses_what_would_make_the_result_meaningless(args, message, trained):
    if "rebuilt" in args:
        meta = json.load(open(trained / "data" / "rot" / "meta.json"))
        json.dump(meta | {"key": "another"}, open(trained / "data" / "rot" / "meta.json", "w"))
    p = run("train.py", *[a for a in args if a != "rebuilt"], "--out_dir=o", cwd=trained,
            check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr

def test_finetuning_starts_from_the_checkpoints_weights_with_a_fresh_run(trained):
    # the checkpoint on rot2, a dataset of the same encoder
    run("train.py", "--eval_only=True", "--out_dir=o", "--dataset=rot2", cwd=trained)
    before = json.load(open(trained / "o" / "eval.json"))["model"]["loss"]
    run("train.py", *TRAIN[:-1], "--dataset=rot2", "--init_from=o", "--out_dir=ft", "--max_iters=6",
        "--eval_interval=3", "--dropout=0.1", cwd=trained)
    log = log_of(trained / "ft")
    first = [r for r in log if "val" in r][0]
    assert first["iter"] == 0 and abs(first["val"]["model"]["loss"] - before) <= 1e-4 * before
    # its own schedule: the warm-up starts again
    assert [r["iter"] for r in log if "loss" in r][0] == 1 and log[1]["lr"] < 4e-4 / 10
    ckpt = torch.load(trained / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["init_from"] == "o" and ckpt["model_args"]["dropout"] == 0.1
    assert ckpt["data"]["dir"] == str(trained / "data" / "rot2")
    base = torch.load(trained / "o" / "ckpt.pt", weights_only=True)
    assert torch.equal(ckpt["model"]["normalizer.center"], base["model"]["normalizer.center"])

@pytest.mark.parametrize("args, message", [
    (["--dataset=wide"], "holds stand-in concepts (d_emb 24), but o was trained on stand-in (d_emb 16)"),
    (["--dataset=rot2", "--n_layer=3"], "--n_layer=3, but o was made with n_layer=2"),
    (["--dataset=rot2", "--out_dir=o"], "is --out_dir's own checkpoint: finetune into another --out_dir"),
    (["--dataset=rot2", "--init_from=nope"], "no checkpoint at nope"),
])
def test_finetuning_refuses_another_concept_space_or_model(args, message, trained):
    p = run("train.py", "--init_from=o", "--out_dir=ft", *args, cwd=trained, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (trained / "ft" / "ckpt.pt").exists()

def test_a_diffusion_run_resumes_exactly_and_evaluates_with_sampling_settings_changed(rotation_data,
                                                                                     tmp_path):
    args = [*TRAIN, f"--data_root={rotation_data}", "--model_type=diffusion", "--eval_interval=10",
              "--ddim_steps=4", "--dropout=0.1", "--lr_decay_iters=20", "--always_save_checkpoint=True",
              "--patience=0", "--eval_iters=2"]
    run("train.py", *args, "--max_iters=20", "--out_dir=a", cwd=tmp_path)
    run("train.py", *args, "--max_iters=10", "--out_dir=b", cwd=tmp_path)
    run("train.py", "--init_from=resume", "--out_dir=b", "--max_iters=20", cwd=tmp_path)
    losses = lambda out: {r["iter"]: r["loss"] for r in log_of(tmp_path / out) if "loss" in r}
    a, b = losses("a"), losses("b")
    assert sorted(b) == list(range(1, 21))
    assert all(abs(a[i] - b[i]) <= 1e-5 * abs(a[i]) for i in range(11, 21)), (a, b)
    model, ckpt = common.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert isinstance(model, DiffusionLCM) and model.config.ddim_steps == 4
    # sampling's settings may change after training; the model's may not
    p = run("train.py", "--eval_only=True", "--out_dir=b", "--guidance=1.5", cwd=tmp_path)
    assert "changed from the checkpoint: guidance 3.0 -> 1.5" in p.stdout
    assert 0.5 < json.load(open(tmp_path / "b" / "eval.json"))["model"]["ca"] <= 1
    p = run("train.py", "--init_from=resume", "--out_dir=b", "--n_embd=64", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "the model's settings cannot change" in p.stderr
    p = run("train.py", "--init_from=resume", "--out_dir=b", "--model_type=baselcm", cwd=tmp_path,
            check=False)
    assert p.returncode == 1 and "the model's settings cannot change" in p.stderr

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(HERE, "train.py")]

def test_ddp_on_two_gloo_processes_logs_what_one_process_logs(rotation_data, tmp_path):
    common = [*TRAIN, f"--data_root={rotation_data}", "--eval_interval=15", "--max_iters=15",
              "--dropout=0.0", "--device=cpu"]  # the default: one micro-batch, shared by the two processes
    run("train.py", *common, "--out_dir=single", cwd=tmp_path)
    p = run(TORCHRUN, *common, "--out_dir=ddp", cwd=tmp_path)
    assert "2 processes" in p.stdout
    val = lambda out: [r["val"]["model"]["loss"] for r in log_of(tmp_path / out) if "val" in r][-1]
    assert abs(val("ddp") - val("single")) <= 1e-3 * val("single")
    # the global batch's loss, not rank 0's share of it
    loss = lambda out: [r["loss"] for r in log_of(tmp_path / out) if "loss" in r]
    assert len(loss("ddp")) == 15
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(loss("ddp"), loss("single"))), (loss("ddp"), loss("single"))
    # the global FLOPs over the peak of both processes
    assert all(0 < r["mfu"] <= 1 for r in log_of(tmp_path / "ddp") if "mfu" in r)

def test_a_resumed_ddp_run_replays_each_ranks_dropout_exactly(rotation_data, tmp_path):
    common = [*TRAIN, f"--data_root={rotation_data}", "--eval_interval=10", "--dropout=0.2",
              "--lr_decay_iters=20", "--always_save_checkpoint=True", "--patience=0", "--device=cpu"]
    run(TORCHRUN, *common, "--max_iters=20", "--out_dir=a", cwd=tmp_path)
    run(TORCHRUN, *common, "--max_iters=10", "--out_dir=b", cwd=tmp_path)
    p = run(TORCHRUN, "--init_from=resume", "--out_dir=b", "--max_iters=20", cwd=tmp_path)
    assert "random states" not in p.stdout
    losses = lambda out: {r["iter"]: r["loss"] for r in log_of(tmp_path / out) if "loss" in r}
    a, b = losses("a"), losses("b")
    assert sorted(b) == list(range(1, 21))
    assert all(abs(a[i] - b[i]) <= 1e-5 * abs(a[i]) for i in range(11, 21)), (a, b)

def test_rng_states_restore_each_generator_of_the_device_a_run_drew_from(monkeypatch, capsys):
    torch.manual_seed(3)
    states = common.rng_states("cpu")
    drawn = torch.rand(4)
    torch.manual_seed(4)
    common.set_rng_states(states, "cpu", 0, 1)
    assert torch.equal(torch.rand(4), drawn)
    assert capsys.readouterr().out == ""
    # a GPU's generator (torch.cuda's functions stand in for one): saved, and restored on that kind only
    gpu = {"state": torch.tensor([1, 2], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: gpu["state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: gpu.update(state=s))
    states = common.rng_states("cuda")
    assert states[0]["device"] == "cuda" and torch.equal(states[0]["cuda"], torch.tensor([1, 2]))
    gpu["state"] = torch.tensor([9, 9], dtype=torch.uint8)
    common.set_rng_states(states, "cuda", 0, 1)
    assert torch.equal(gpu["state"], torch.tensor([1, 2]))
    common.set_rng_states(states, "cpu", 0, 2)
    assert "states of 1 process(es) on cuda, this run is 2 on cpu" in capsys.readouterr().out

def test_compile_where_it_cannot_work_runs_eager_after_one_line(rotation_data, tmp_path):
    # no C++ compiler: what torch.compile needs on a CPU (a GPU needs triton)
    env = dict(ENV, CXX="/nonexistent/g++")
    p = run("train.py", *TRAIN, f"--data_root={rotation_data}", "--out_dir=o", "--max_iters=3",
            "--eval_interval=3", "--compile=True", cwd=tmp_path, env=env)
    said = [line for line in p.stdout.splitlines() if "compile" in line]
    assert len(said) == 1 and "cpu cannot compile (InvalidCxxCompiler" in said[0], p.stdout
    assert "running eager" in said[0] and "Traceback" not in p.stderr
    assert max(r["iter"] for r in log_of(tmp_path / "o")) == 3

def test_a_device_the_machine_does_not_have_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common.get_device("") == "cuda"
    assert common.get_device("cuda:0") == "cuda:0"
    with pytest.raises(SystemExit):
        common.get_device("cuda:5")
    err = capsys.readouterr().err
    assert err == "error: --device=cuda:5, but this machine has 1 cuda device: use an index below 1, " \
                  "or leave it empty\n"

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

@pytest.mark.parametrize("script", ["embed.py", "train.py", "sample.py", "bench.py"])
def test_help_lists_every_knob_with_its_default(script, tmp_path):
    for flag in ("--help", "-h"):
        p = run(script, flag, "--n_layer=oops", cwd=tmp_path)
        assert p.stdout.startswith(open(os.path.join(HERE, script)).read().split('"""')[1].strip())
        knobs = script_knobs(script)
        assert len(knobs) >= 6
        for name, value in knobs.items():
            assert f"  --{name}={value if value != '' else repr(value)}" in p.stdout, name
    # the comment beside a knob, and one continued on the next line
    p = run("embed.py", "--help", cwd=tmp_path)
    assert "--max_docs=0                       0 = all documents" in p.stdout
    assert "a hub dataset's name" in p.stdout

@pytest.mark.parametrize("script, typo, knob", [("train.py", "max_iter", "max_iters"),
                                                ("sample.py", "num_sample", "num_samples"),
                                                ("embed.py", "datset", "dataset")])
def test_a_misspelt_option_names_the_knob_meant(script, typo, knob, tmp_path):
    p = run(script, f"--{typo}=5", cwd=tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.strip().endswith(f"did you mean --{knob}?"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr

def wandb_records(run_dir):
    """The records of an offline W&B run, from its run-ID.wandb file: a 7-byte header, then a
    LevelDB-style log of 32 KiB blocks (4-byte checksum, 2-byte length, 1-byte type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records = []
    part = b""
    at = 7
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:
            # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        length = int.from_bytes(data[at + 4:at + 6], "little")
        kind = data[at + 6]
        part += data[at + 7:at + 7 + length]
        at += 7 + length
        # 1: a whole record; 4: the last piece of one
        if kind in (1, 4):
            records.append(pb.Record.FromString(part))
            part = b""
    return records

def test_wandb_logs_training_and_evaluation_offline_and_a_resume_continues_the_run(rotation_data,
                                                                                    tmp_path):
    env = dict(ENV, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    args = [*TRAIN, f"--data_root={rotation_data}", "--out_dir=o", "--eval_interval=10"]
    run("train.py", *args, "--max_iters=20", "--wandb_log=True", "--log_interval=5",
        cwd=tmp_path, env=env)
    run("train.py", "--init_from=resume", "--out_dir=o", "--max_iters=30", cwd=tmp_path, env=env)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {r.name.rsplit("-", 1)[1] for r in runs}
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ids == {ckpt["wandb_id"]}
    for run_dir, steps in zip(runs, ([5, 10, 15, 20], [25, 30])):
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                   for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]
        train = [h for h in history if "train/loss" in h]
        assert [h["_step"] for h in train] == steps
        assert all({"lr", "ms", "mfu"} <= set(h) for h in train)
        val = [h for h in history if "val/model/loss" in h]
        assert val and all({f"val/{k}/{m}" for k in ("model", "copy", "mean")
                            for m in ("loss", "l2", "ca")} <= set(h) for h in val)
    config = [r.run.config for r in wandb_records(runs[0]) if r.WhichOneof("record_type") == "run"]
    assert any(u.key == "n_embd" and json.loads(u.value_json) == 32 for c in config for u in c.update)

@pytest.mark.parametrize("case, message", [
    ("broken", "--wandb_log=True, but wandb does not import (ImportError: no such luck): pip install wandb"),
    ("no login", "W&B has no login: run `wandb login`, or set WANDB_MODE=offline")])
def test_wandb_without_a_working_install_or_a_login_is_one_line(case, message, rotation_data,
                                                                 tmp_path):
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path), "WANDB_DIR": str(tmp_path)}
    if case == "broken":
        (tmp_path / "wandb").mkdir()
        (tmp_path / "wandb" / "__init__.py").write_text("raise ImportError('no such luck')")
        env["PYTHONPATH"] = str(tmp_path)
    p = run("train.py", *TRAIN, f"--data_root={rotation_data}", "--out_dir=o", "--max_iters=2",
            "--wandb_log=True", cwd=tmp_path, env=env, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "o" / "ckpt.pt").exists()

@pytest.mark.parametrize("args, message", [
    (["--n_layerz=3"], "unknown option 'n_layerz'"),
    (["--n_layer=three"], "--n_layer wants a int"),
    (["--batch_size=0"], "--batch_size=0 must be at least 1"),
    (["--n_embd=30", "--n_head=4"], "must be a multiple of --n_head"),
    (["--dataset=nope"], "no dataset at"),
    (["config/nope.py"], "config file config/nope.py not found"),
    (["--device=gpu"], "--device=gpu is not a device"),
    (["--device=cuda"], "--device=cuda, but this machine has no cuda"),
    (["--out_dir={tmp}/afile/o"], "cannot write to --out_dir"),
    (["--mi_model=gpt2"], "--mi_model=gpt2 needs --eval_only=True"),
    (["--init_from=resume", "--out_dir={tmp}/truncated"], "is not a readable baselcm checkpoint"),
    (["--eval_only=True", "--out_dir={tmp}/empty"], "is not a readable baselcm checkpoint"),
])
def test_bad_configuration_gives_one_clear_line(args, message, tmp_path):
    (tmp_path / "afile").write_text("")
    for name, content in (("truncated", b"PK\x03\x04 cut short"), ("empty", b"")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "ckpt.pt").write_bytes(content)
    p = run("train.py", f"--out_dir={tmp_path}/o", *[a.format(tmp=tmp_path) for a in args],
            cwd=HERE, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr

# -----------------------------------------------------------------------------
# embed.py

def test_sentences_are_cut_on_word_boundaries_never_dropped():
    nlp = concepts.sentence_splitter()
    long = " ".join(f"word{i}" for i in range(80))
    docs = concepts.split_sentences(nlp, [f"Short  one.\n\nThen {long}.", "   ", "Final."],
                                    max_chars=50)
    assert docs[0][0] == "Short one."
    assert all(len(s) <= 50 for s in docs[0]) and " ".join(docs[0][1:]) == f"Then {long}."
    assert docs[1] == [] and docs[2] == ["Final."]

@pytest.mark.parametrize("text, sentences", [
    ("火灾正在向小镇蔓延。居民已经撤离。警方关闭了高速公路。", ["火灾正在向小镇蔓延。", "居民已经撤离。", "警方关闭了高速公路。"]),
    ("明日は雨でしょう！本当？「はい。」と言った。", ["明日は雨でしょう！", "本当？", "「はい。」と言った。"]),
    ("यह एक वाक्य है।यह दूसरा है।", ["यह एक वाक्य है।", "यह दूसरा है।"]),
    ("هل هذا سؤال؟نعم هذا سؤال.", ["هل هذا سؤال؟", "نعم هذا سؤال."]),
    ("ዛሬ ዝናብ ዘነበ።ነገ ፀሐይ ይወጣል።", ["ዛሬ ዝናብ ዘነበ።", "ነገ ፀሐይ ይወጣል።"]),
    ("Pi is 3.14. Really? Yes. Fine!", ["Pi is 3.14.", "Really?", "Yes.", "Fine!"]),
])
def test_sentences_are_split_in_scripts_without_spaces(text, sentences):
    assert concepts.split_sentences(concepts.sentence_splitter(), [text]) == [sentences]

def test_a_document_longer_than_spacys_limit_is_split_whole():
    text = "".join(f"Sentence number {i} is here. " for i in range(40_000))  # 1.2M characters
    assert len(text) > 1_000_000
    [sents] = concepts.split_sentences(concepts.sentence_splitter(), [text])
    assert sents == [f"Sentence number {i} is here." for i in range(40_000)]

def test_a_string_option_takes_the_text_as_given():
    g = {"start": "x", "n_layer": 2, "compile": False}
    given = common.configure(g, ["--start=2024", "--n_layer=3", "--compile=True"])
    assert given == {"start", "n_layer", "compile"}
    assert g == {"start": "2024", "n_layer": 3, "compile": True}
    common.configure(g, ["--start='quoted' [1, 2]"])
    assert g["start"] == "'quoted' [1, 2]"

def test_embed_with_sonar_writes_the_data_format(sonar_env, tmp_path):
    env, calls = sonar_env
    src = corpus(tmp_path / "docs.txt")
    with open(src, "a") as f:
        f.write("   \n")  # an empty document: skipped and counted
    run("embed.py", f"--dataset={src}", "--encoder=sonar", "--lang=deu_Latn", "--batch_size=7",
        "--chunk_docs=5", "--val_fraction=0.25", "--device=cpu", cwd=tmp_path, env=env)
    d = read_dataset(tmp_path / "data" / "docs")
    meta = d["meta"]
    assert meta["encoder"] == "sonar" and meta["d_emb"] == 1024 and meta["empty_docs_skipped"] == 1
    assert meta["train_docs"] + meta["val_docs"] == 12 and meta["val_docs"] > 0
    init = [c for c in calls() if c["call"] == "encoder_init"][0]
    assert init["encoder"] == "text_sonar_basic_encoder" and init["device"] == "cpu"
    enc = [c for c in calls() if c["call"] == "encode"]
    assert {c["source_lang"] for c in enc} == {"deu_Latn"} and {c["batch_size"] for c in enc} == {7}
    eot = np.array(meta["eot"], dtype=np.float16)
    for s in ("train", "val"):
        rows, offsets, texts = d[s]
        assert len(rows) == offsets[-1] == len(texts)
        assert all(texts[o - 1] == concepts.EOT_TEXT and np.array_equal(rows[o - 1],
                                                                        eot) for o in offsets[1:])
        stand_in = torch.stack([torch.randn(1024, generator=torch.Generator().manual_seed(
            __import__("zlib").crc32(t.encode()))) for t in texts]).numpy().astype(np.float16)
        assert np.array_equal(rows, stand_in)  # each row is its own sentence's embedding
    # whitespace normalized
    assert "Document 3 says thing 0 about topic 0." in d["train"][2] + d["val"][2]
    center, scale = fit_normalizer(d["train"][0].astype(np.float32))
    assert np.allclose(meta["normalizer"]["center"],
                       center) and np.allclose(meta["normalizer"]["scale"], scale)
    assert set(meta) >= set(write_dataset(tmp_path / "x", "y", [np.zeros((2, 3))],
                                          [np.zeros((2, 3))], np.zeros(3)))
    assert not list((tmp_path / "data" / "docs").glob("work*"))
    again = run("embed.py", f"--dataset={src}", "--encoder=sonar", "--lang=deu_Latn",
                "--chunk_docs=5", "--val_fraction=0.25", cwd=tmp_path, env=env)
    assert "already built" in again.stdout

def test_embed_resumes_after_kill_9_with_identical_files(sonar_env, tmp_path):
    env, calls = sonar_env
    src = corpus(tmp_path / "docs.txt", n_docs=30)
    args = [f"--dataset={src}", "--encoder=sonar", "--chunk_docs=2", "--device=cpu"]
    run("embed.py", *args, "--name=whole", cwd=tmp_path, env=env)
    n_done = kill_after_chunks(args, env, tmp_path, 3)
    assert 3 <= n_done < 15
    n_before = len([c for c in calls() if c["call"] == "encode"])
    run("embed.py", *args, cwd=tmp_path, env=env)
    # eot + the rest
    assert len([c for c in calls() if c["call"] == "encode"]) - n_before == 1 + 15 - n_done
    for f in ("train.bin", "val.bin", "train.txt", "val.txt", "train_offsets.npy",
              "val_offsets.npy", "meta.json"):
        assert (tmp_path / "data" / "whole" / f).read_bytes() == (tmp_path / "data" / "docs" / f).read_bytes()

def test_embed_on_two_processes_equals_one(sonar_env, tmp_path):
    env, _ = sonar_env
    src = corpus(tmp_path / "docs.txt", n_docs=20)
    args = [f"--dataset={src}", "--encoder=sonar", "--chunk_docs=3", "--device=cpu"]
    run("embed.py", *args, "--name=one", cwd=tmp_path, env=env)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(HERE, "embed.py")], *args, "--name=two", cwd=tmp_path, env=env)
    for f in ("train.bin", "val.bin", "train.txt", "train_offsets.npy", "meta.json"):
        assert (tmp_path / "data" / "one" / f).read_bytes() == (tmp_path / "data" / "two" / f).read_bytes()

def test_official_lcm_parquet_is_imported_without_reencoding(sonar_env, tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    env, calls = sonar_env
    rng = np.random.default_rng(0)
    sents = [[f"Doc {i}, sentence {j}." for j in range(3 + i % 3)] for i in range(10)]
    embs = [rng.normal(size=(len(s), 1024)).astype(np.float32) for s in sents]
    pq.write_table(pa.table({"text_sentences": sents,
                             "text_sentences_sonar_emb": [list(e) for e in embs]}),
                   tmp_path / "lcm.parquet")
    run("embed.py", f"--dataset={tmp_path / 'lcm.parquet'}", "--val_fraction=0.3", "--device=cpu",
        cwd=tmp_path, env=env)
    # one call: end of text, a full batch of it (a warm-up)
    assert [c["n"] for c in calls() if c["call"] == "encode"] == [128]
    d = read_dataset(tmp_path / "data" / "lcm")
    rows = np.concatenate([d["train"][0], d["val"][0]])
    texts = d["train"][2] + d["val"][2]
    for s, e in zip(sents, embs):
        at = texts.index(s[0])
        assert texts[at:at + len(s) + 1] == s + [concepts.EOT_TEXT]
        assert np.array_equal(rows[at:at + len(s)], e.astype(np.float16))

def test_a_pairs_dataset_round_trips_through_the_on_disk_format(sonar_env, tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    env, calls = sonar_env
    pairs, expect = [], []
    for i in range(12):
        prompt, answer = [f"Question {i} is here.", "It has two sentences."], [f"Answer {i}."] + [
            f"Answer {i} again."] * (i % 2)
        # text, split by spaCy; or lists of sentences already split; an empty answer is skipped
        pairs.append({"prompt": prompt if i == 5 else " ".join(prompt),
                      "answer": "" if i == 7 else " ".join(answer), "split": "val" if i % 4 == 0 else "train"})
        expect.append((prompt + ["[MODEL]:"], answer, pairs[-1]["split"]) if i != 7 else None)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run("embed.py", f"--dataset={tmp_path / 'qa.jsonl'}", "--pairs=prompt,answer", "--split_column=split",
        "--prompt_end=[MODEL]:", "--encoder=sonar", "--chunk_docs=5", cwd=tmp_path, env=env)
    d = read_dataset(tmp_path / "data" / "qa")
    assert d["meta"]["pairs"] and d["meta"]["prompt_end"] == "[MODEL]:"
    assert d["meta"]["empty_docs_skipped"] == 1
    for split in ("train", "val"):
        rows, offsets, texts = d[split]
        starts = datafiles.load_split(str(tmp_path / "data" / "qa"), split, d["meta"])[2]
        docs = [texts[lo:end] for lo, end in zip(offsets[:-1], offsets[1:])]
        mine = [e for e in expect if e and e[2] == split]
        assert len(docs) == len(mine) == len(starts) > 0
        for doc, lo, start, (prompt, answer, _) in zip(docs, offsets, starts, mine):
            assert doc == prompt + answer + [concepts.EOT_TEXT]
            assert start - lo == len(prompt) and texts[start] == answer[0]
    # the official schema's pairs: prompt and text sentences with their embeddings, not encoded again
    rng = np.random.default_rng(0)
    prompts = [[f"Prompt {i}."] * 2 for i in range(6)]
    answers = [[f"Text {i}."] for i in range(6)]
    emb = lambda sents: [list(e) for e in rng.normal(size=(len(sents), 1024)).astype(np.float32)]
    table = {"prompt_sentences": prompts, "prompt_sentences_sonar_emb": [emb(p) for p in prompts],
             "text_sentences": answers, "text_sentences_sonar_emb": [emb(a) for a in answers]}
    pq.write_table(pa.table(table), tmp_path / "official.parquet")
    run("embed.py", f"--dataset={tmp_path / 'official.parquet'}", "--val_fraction=0.3", cwd=tmp_path, env=env)
    d = read_dataset(tmp_path / "data" / "official")
    assert d["meta"]["pairs"]
    rows = np.concatenate([d["train"][0], d["val"][0]])
    texts = d["train"][2] + d["val"][2]
    for i in range(6):
        at = texts.index(f"Prompt {i}.")
        assert texts[at:at + 4] == prompts[i] + answers[i] + [concepts.EOT_TEXT]
        given = np.array(table["prompt_sentences_sonar_emb"][i] + table["text_sentences_sonar_emb"][i])
        assert np.array_equal(rows[at:at + 3], given.astype(np.float16))

@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("column", "no column 'body'"),
    ("empty", "has no documents"),
    ("bytes", "not valid UTF-8"),
    ("parquet", "cannot read"),
    ("lang", "unknown language code 'english'"),
    ("nosonar",
     "cannot load 'cointegrated/SONAR_200_text_encoder' for the transformers port of SONAR"),
    ("broken sonar",
     "SONAR (sonar-space) is broken (OSError: /x/_torchaudio.abi3.so: undefined symbol"),
    ("hub", "cannot load dataset 'nobody-here/no-such-dataset'"),
    ("--val_fraction=1.0", "--val_fraction=1.0 must be between 0 and 1"),
    ("--batch_size=0", "--batch_size=0 must be at least 1"),
    ("--chunk_docs=0", "--chunk_docs=0 must be at least 1"),
    ("--max_chars=0", "--max_chars=0 must be at least 1"),
    ("--max_docs=-1", "--max_docs=-1 must be 0"),
    ("--device=cuda", "this machine has no cuda"),
    ("data_root", "cannot write to --data_root"),
])
def test_embed_bad_input_gives_one_line_and_leaves_no_dataset(case, message, sonar_env, tmp_path):
    env, _ = sonar_env
    src = corpus(tmp_path / "docs.txt")
    args = {"missing": [f"--dataset={tmp_path / 'nope.jsonl'}"],
            "column": [f"--dataset={src}", "--text_column=body"],
            "empty": [f"--dataset={tmp_path / 'empty.txt'}"],
            "bytes": [f"--dataset={tmp_path / 'bad.txt'}"],
            "parquet": [f"--dataset={tmp_path / 'bad.parquet'}"],
            "hub": ["--dataset=nobody-here/no-such-dataset"],  # offline: the hub is unreachable
            "data_root": [f"--dataset={src}", f"--data_root={tmp_path / 'afile' / 'data'}"],
            "lang": [f"--dataset={src}", "--lang=english"]}.get(case, [f"--dataset={src}", case])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "afile").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"Fine line.\n" * 5 + b"Bad \xff\xfe byte.\n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    if case == "nosonar":
        env = ENV
    if case == "broken sonar":  # imports, then fails as a torchaudio built for another torch does
        (tmp_path / "fake" / "sonar" / "inference_pipelines" / "text.py").write_text(
            "raise OSError('/x/_torchaudio.abi3.so: undefined symbol: _ZN3c10')")
    p = run("embed.py", "--encoder=sonar", "--device=cpu",
            *[a for a in args if a not in ("nosonar", "broken sonar")],
            cwd=tmp_path, env=env, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not list(tmp_path.glob("data/*/meta.json")) and ("network" in p.stderr) == (case == "hub")

def kill_after_chunks(args, env, cwd, n):
    """Starts embed.py with a slow encoder and kills it (-9) once n chunks are on disk."""
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "embed.py"), *args], cwd=cwd,
                         env=dict(env, FAKE_SONAR_DELAY="0.3"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    work, deadline = cwd / "data" / "docs", time.time() + 120
    while time.time() < deadline and len(list(work.glob("work-*/chunk*.npz"))) < n:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (cwd / "data" / "docs" / "meta.json").exists()
    return len(list(work.glob("work-*/chunk*.npz")))

def test_partial_work_from_other_settings_is_never_reused(sonar_env, tmp_path):
    env, _ = sonar_env
    src = corpus(tmp_path / "docs.txt", n_docs=30)
    args = [f"--dataset={src}", "--encoder=sonar", "--device=cpu"]
    assert kill_after_chunks([*args, "--chunk_docs=2"], env, tmp_path, 3) < 15
    p = run("embed.py", *args, "--dtype=float32", cwd=tmp_path, env=env)  # other chunking and dtype
    assert "partial work from other settings: starting clean" in p.stdout
    run("embed.py", *args, "--dtype=float32", "--name=clean", cwd=tmp_path, env=env)
    for f in ("train.bin", "val.bin", "train.txt", "val.txt", "train_offsets.npy"):
        assert (tmp_path / "data" / "docs" / f).read_bytes() == (tmp_path / "data" / "clean" / f).read_bytes()

def test_a_failed_run_does_not_block_the_fixed_rerun(sonar_env, tmp_path):
    env, _ = sonar_env
    src = tmp_path / "docs.txt"
    src.write_text("Only one document. It has two sentences.\n")
    p = run("embed.py", f"--dataset={src}", "--encoder=sonar", "--device=cpu", cwd=tmp_path,
            env=env, check=False)
    assert p.returncode == 1 and "empty" in p.stderr
    corpus(src, n_docs=30)  # the fix: more documents in the same file
    run("embed.py", f"--dataset={src}", "--encoder=sonar", "--device=cpu", cwd=tmp_path, env=env)
    meta = json.load(open(tmp_path / "data" / "docs" / "meta.json"))
    assert meta["train_docs"] + meta["val_docs"] == 30

def test_another_source_or_other_settings_under_the_same_name_are_refused(sonar_env, tmp_path):
    env, _ = sonar_env
    txt, jsonl = corpus(tmp_path / "docs.txt", n_docs=30), tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in txt.read_text().splitlines()[::-1]))
    run("embed.py", f"--dataset={txt}", "--encoder=sonar", cwd=tmp_path, env=env)
    for args, message in (([f"--dataset={jsonl}"],
                           f"data/docs was built from {txt}: pass --name=NEW"),
                          ([f"--dataset={txt}", "--max_chars=100"],
                           "was built with other settings (max_chars)")):
        p = run("embed.py", *args, "--encoder=sonar", cwd=tmp_path, env=env, check=False)
        assert p.returncode == 1 and message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    run("embed.py", f"--dataset={jsonl}", "--encoder=sonar", "--overwrite=True",
        cwd=tmp_path, env=env)
    meta = json.load(open(tmp_path / "data" / "docs" / "meta.json"))
    assert meta["settings"]["dataset"] == str(jsonl)
    json.dump({k: v for k, v in meta.items() if k != "settings"},
              open(tmp_path / "data" / "docs" / "meta.json", "w"))
    # made before
    p = run("embed.py", f"--dataset={jsonl}", "--encoder=sonar", cwd=tmp_path, env=env, check=False)
    assert p.returncode == 1 and "was built by an older baselcm, which did not record its settings" in p.stderr

def test_a_folder_of_txt_files_is_one_document_per_file(sonar_env, tmp_path):
    env, _ = sonar_env
    names = ["training-notes.txt", "doc001.txt", "doc002.txt", "sub/validation.txt",
             "test.txt", "zz.txt"]
    for i, name in enumerate(names):
        (tmp_path / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / name).write_text(f"File {i} line one.\nFile {i} line two.\n\nFile {i} line three.\n")
    run("embed.py", f"--dataset={tmp_path / 'docs'}", "--encoder=sonar", "--val_fraction=0.3",
        cwd=tmp_path, env=env)
    d = read_dataset(tmp_path / "data" / "docs")
    lengths = np.concatenate([np.diff(d["train"][1]), np.diff(d["val"][1])])
    # three sentences and end of text, from each file
    assert len(lengths) == 6 and (lengths == 4).all()
    files = {t.split()[1] for t in d["train"][2] + d["val"][2] if t.startswith("File")}
    assert files == {str(i) for i in range(6)}

# -----------------------------------------------------------------------------
# end to end with the real offline encoder, and the SONAR decode glue

def test_minilm_end_to_end_embed_train_sample(tmp_path, tiny_lm):
    src = tmp_path / "news.jsonl"
    from gensim.test.utils import datapath
    docs = open(datapath("lee_background.cor")).read().splitlines()[:24]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run("embed.py", f"--dataset={src}", "--val_fraction=0.2", cwd=tmp_path)
    meta = json.load(open(tmp_path / "data" / "news" / "meta.json"))
    assert meta["encoder"] == "minilm" and meta["d_emb"] == 384
    # data/news
    run("train.py", "--dataset=news", "--max_iters=4", "--eval_interval=4", *TRAIN[:-1],
        cwd=tmp_path)
    p = run("sample.py", "--start=Firefighters battled the blaze overnight. The wind changed.",
            "--json=True",
            "--max_new_concepts=3", cwd=tmp_path)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["prompt"] == ["Firefighters battled the blaze overnight.", "The wind changed."]
    bank = set((tmp_path / "data" / "news" / "train.txt").read_text().splitlines())
    assert 1 <= len(result["steps"]) <= 3 and all(s["text"] in bank for s in result["steps"]), result
    assert all(-1 <= s["retrieved_cos"] <= 1 for s in result["steps"])
    said = [s["text"] for s in result["steps"]]
    assert len(set(said)) == len(said) and not set(said) & set(result["prompt"])
    text = run("sample.py", "--start=The wind changed.", "--max_new_concepts=2",
               cwd=tmp_path).stdout
    assert "[retrieved, cos " in text
    # the diffusion model: a checkpoint says which model it holds, and sample.py follows it
    run("train.py", "--dataset=news", "--max_iters=4", "--eval_interval=4", "--model_type=diffusion",
        "--ddim_steps=4", "--out_dir=out-diffusion", *TRAIN[:-1], cwd=tmp_path)
    p = run("sample.py", "--out_dir=out-diffusion", "--start=The wind changed.", "--json=True",
            "--max_new_concepts=3", "--num_samples=2", "--stop_eot=2", "--stop_repeat=0", cwd=tmp_path)
    samples = [json.loads(line) for line in p.stdout.strip().splitlines()[-2:]]
    said = [[s["text"] for s in sample["steps"]] for sample in samples]
    assert [len(s) for s in said] == [3, 3] and all(t in bank for s in said for t in s)
    # each sample starts from its own noise
    assert said[0] != said[1]
    for part in tiny_lm:
        part.save_pretrained(tmp_path / "lm")
    p = run("train.py", "--eval_only=True", f"--mi_model={tmp_path / 'lm'}", cwd=tmp_path)
    assert "decoded text: retrieval of the nearest training sentence" in p.stdout
    results = json.load(open(tmp_path / "out" / "eval.json"))
    gen = results["continuations"]
    assert gen["random"]["samples"] > 0 and gen["decoded"]["distinct"] == 1.0
    assert all(np.isfinite(results[k]["mi"]) and results[k]["mi"] != 0 for k in ("model", "copy",
                                                                                 "mean")), results

def test_sample_decodes_with_sonar_in_the_requested_language(sonar_env, tmp_path):
    env, calls = sonar_env
    torch.manual_seed(0)
    model = BaseLCM(tiny_config(d_emb=1024))
    eot = torch.randn(1024)
    data = SONAR_DATA | {"eot": eot.tolist(), "dir": str(tmp_path / "nowhere")}
    save_checkpoint(tmp_path / "out", model, data)
    p = run("sample.py", "--start=One sentence. Two sentences.", "--lang=fra_Latn",
            "--max_new_concepts=4",
            "--device=cpu", cwd=tmp_path, env=env)
    assert p.stdout.splitlines()[:3] == ["One sentence.", "Two sentences.", "<fra_Latn> sentence 0"]
    enc = [c for c in calls() if c["call"] == "encode"]
    dec = [c for c in calls() if c["call"] == "decode"]
    # the language check, the prompt, then each decoded sentence encoded back into the context: the
    # stand-in decodes every concept to the same sentence, so the second is a repeat and stops
    assert [(c["source_lang"], c["n"]) for c in enc] == [("fra_Latn", 1), ("eng_Latn", 2),
                                                         ("fra_Latn", 1), ("fra_Latn", 1)]
    assert dec == [{"call": "decode", "n": 1, "target_lang": "fra_Latn", "max_seq_len": 256}] * 2
    assert "(2 concepts, stopped by repeat)" in p.stdout

class RunsCode:  # a pickle that runs a command when loaded without weights_only
    def __reduce__(self):
        return os.system, ("touch pwned",)

@pytest.mark.parametrize("case, message", [
    ("--start=", "the prompt is empty"),
    ("--out_dir=missing", "no checkpoint at missing/ckpt.pt"),
    ("--lang=french", "unknown language code 'french'"),
    ("--start=FILE:latin1.txt", "prompt file latin1.txt is not UTF-8"),
    ("--device=gpu", "--device=gpu is not a device"),
    ("truncated", "is not a readable baselcm checkpoint"),
    ("foreign", "is not a readable baselcm checkpoint"),
    ("runs code", "is not a readable baselcm checkpoint (UnpicklingError)"),
    ("no sonar",
     "cannot load 'cointegrated/SONAR_200_text_encoder' for the transformers port of SONAR"),
])
def test_sample_bad_input_gives_one_clear_line(case, message, tmp_path):
    save_checkpoint(tmp_path / "out", BaseLCM(tiny_config(d_emb=1024)), SONAR_DATA)
    ckpt = tmp_path / "out" / "ckpt.pt"
    if case == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:2000])
    if case == "foreign":
        torch.save({"state_dict": BaseLCM(tiny_config()).state_dict()}, ckpt)
    if case == "runs code":
        torch.save({"model": RunsCode()}, ckpt)
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 ouvert.".encode("latin-1"))
    p = run("sample.py", *[case] if case.startswith("--") else [], cwd=tmp_path, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    # hints name sample.py's own options
    assert "--encoder" not in p.stderr and not (tmp_path / "pwned").exists()

# -----------------------------------------------------------------------------
# SONAR without fairseq2: the transformers port's glue (test_sonar.py proves it equal to sonar-space)

@pytest.fixture(scope="module")
def tiny_port(tmp_path_factory):
    """A randomly initialised port (M2M100, 1024 wide like SONAR) and a character-level NLLB tokenizer, saved
    where the port loads them from: no fairseq2, no download. -> the sample.py/train.py options that select it."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder
    root, chars = tmp_path_factory.mktemp("port"), sorted(set("abcdefghijklmnopqrstuvwxyzLRé.,'"))
    tok = NllbTokenizer(vocab={t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>",
                                                           "\u2581", *chars,
                                                              *("\u2581" + c for c in chars)])},
                        merges=[], extra_special_tokens=["eng_Latn", "fra_Latn", "deu_Latn"])
    config = M2M100Config(vocab_size=len(tok), d_model=1024, encoder_layers=1, decoder_layers=1,
                          encoder_ffn_dim=64,
                          decoder_ffn_dim=64, encoder_attention_heads=16,
                          decoder_attention_heads=16, scale_embedding=True,
                          max_position_embeddings=512, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2,
                          decoder_start_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    for name, model in (("encoder", M2M100Encoder(config)),
                        ("decoder", M2M100ForConditionalGeneration(config))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return [f"--sonar_hf_encoder={root / 'encoder'}", f"--sonar_hf_decoder={root / 'decoder'}"]

def test_sonar_runs_through_its_transformers_port_without_sonar_space(tiny_port, tmp_path):
    french = ["Le feu a pris la nuit.", "La route est fermée.", "Les habitants sont partis.",
              "Il pleut enfin."]
    (tmp_path / "fr.txt").write_text("".join(" ".join(french[i % 4:] + french[:i % 4]) + "\n" for i in range(20)))
    p = run("embed.py", f"--dataset={tmp_path / 'fr.txt'}", "--encoder=sonar", "--lang=fra_Latn",
            "--val_fraction=0.2",
            tiny_port[0], cwd=tmp_path)  # no sonar-space here: the port
    assert "SONAR through its transformers port" in p.stdout
    d = read_dataset(tmp_path / "data" / "fr")
    assert d["meta"]["encoder"] == "sonar" and d["meta"]["impl"] == "transformers"
    assert d["meta"]["d_emb"] == 1024
    port = concepts.SonarPort("cpu", *(a.split("=", 1)[1] for a in tiny_port))
    rows, _, texts = d["train"]
    assert np.allclose(rows[:6].astype(np.float32),
                       port.encode(texts[:6], lang="fra_Latn"), atol=2e-2)
    run("train.py", "--dataset=fr", "--max_iters=2", "--eval_interval=2", *TRAIN[:-1], cwd=tmp_path)
    p = run("sample.py", "--start=Le feu a pris. La route est fermée.", "--lang=deu_Latn",
            "--max_new_concepts=2",
            "--stop_eot=2", "--json=True", *tiny_port, cwd=tmp_path)
    steps = json.loads(p.stdout.strip().splitlines()[-1])["steps"]
    assert len(steps) == 2 and all(isinstance(s["text"],
                                              str) and "retrieved_cos" not in s for s in steps)
    for args, message in ((["--lang=xyz_Latn", "--stop_eot=-1", *tiny_port],
                           "SONAR does not know the language 'xyz_Latn'"),
                          ([f"--sonar_hf_encoder={tmp_path / 'nowhere'}"],
                           "for the transformers port of SONAR")):
        p = run("sample.py", *args, cwd=tmp_path, check=False)
        assert p.returncode == 1 and message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr

# -----------------------------------------------------------------------------
# what older baselcm wrote keeps working (fixtures/d41f47d: a dataset and a checkpoint from before the
# reading-path rewrite)

def test_a_dataset_and_checkpoint_written_by_d41f47d_still_work(tmp_path):
    import shutil
    fixture = os.path.join(HERE, "fixtures", "d41f47d")
    shutil.copytree(os.path.join(fixture, "data"), tmp_path / "data")
    shutil.copytree(os.path.join(fixture, "out"), tmp_path / "out")
    meta = json.load(open(tmp_path / "data" / "tiny" / "meta.json"))
    # the source where it was embedded, with the size and time it had: embed.py sees the same settings
    source = meta["settings"]["dataset"]
    os.makedirs(os.path.dirname(source), exist_ok=True)
    shutil.copy(os.path.join(fixture, "docs.txt"), source)
    _, size, mtime_ns = meta["settings"]["files"][0]
    assert os.path.getsize(source) == size
    os.utime(source, ns=(mtime_ns, mtime_ns))
    p = run("embed.py", f"--dataset={source}", "--name=tiny", "--val_fraction=0.2", cwd=tmp_path)
    assert "already built with these settings" in p.stdout
    p = run("sample.py", "--start=The fire spread. Residents left.", "--json=True",
            "--max_new_concepts=2",
            "--data_dir=data/tiny", cwd=tmp_path)
    steps = json.loads(p.stdout.strip().splitlines()[-1])["steps"]
    bank = set((tmp_path / "data" / "tiny" / "train.txt").read_text().splitlines())
    assert 1 <= len(steps) <= 2 and all(s["text"] in bank for s in steps)
    run("train.py", "--eval_only=True", cwd=tmp_path)
    assert json.load(open(tmp_path / "out" / "eval.json"))["iter"] == 6
    p = run("train.py", "--init_from=resume", "--max_iters=9", cwd=tmp_path)
    assert "changed from the checkpoint: max_iters 6 -> 9" in p.stdout
    assert max(r["iter"] for r in log_of(tmp_path / "out")) == 9
