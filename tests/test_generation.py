"""
Generation (generation.py): the KV cache against recomputing the window, the stop rules and which
one fired, noise, what is fed back, and batches of texts against one text at a time, for every model.
"""
import numpy as np
import pytest
import torch

import datafiles
from baselcm import BaseLCM
from concepts import SentenceBank, decoder
from conftest import tiny_config, tiny_model, train_toy, write_dataset
from generation import Transcript, generate

NO_STOP = dict(stop_eot=2.0, stop_end=0.0, stop_repeat=0.0)

def recomputed(model, prompt, n):
    """n concepts, each predicted from the whole window (cut to its last half past block_size)"""
    seq = prompt
    start = 0
    for _ in range(n):
        if len(seq) - start > model.config.block_size:
            start = len(seq) - model.config.block_size // 2
        seq = torch.cat([seq, model.predict(seq[None, start:], last=True)[0][0]])
    return seq[len(prompt):]

@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cached_generation_equals_recomputing_the_window_across_the_context_crop(compiled):
    torch.manual_seed(0)
    model = BaseLCM(tiny_config(block_size=8)).eval()
    prompt, eot = torch.randn(3, 16), torch.randn(16)
    b = recomputed(model, prompt, 30)
    if compiled:  # sample.py --compile=True
        torch._dynamo.reset()
        model.compile()
    [(a, cos_a, _)] = generate(model, [prompt], eot, 30, **NO_STOP)
    assert a.shape == (30, 16)  # 3 + 30 concepts: the 8-concept window was cut several times
    assert torch.allclose(a, b, atol=1e-4)
    assert np.allclose(cos_a, torch.cosine_similarity(b, eot[None]).numpy(), atol=1e-4)
    # the prompt's prefill, the one-concept step, the prefill after a cut: no graph per position
    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3

def test_generation_stops_at_end_of_text_on_repeat_and_at_max_and_says_which():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    prompt = torch.randn(2, 16)
    first = generate(model, [prompt], torch.randn(16), 1, **NO_STOP)[0][0][0]
    # eot == the first prediction
    [(new, cos, reason)] = generate(model, [prompt], first.clone(), 10, stop_end=0.0)
    assert reason == "eot" and len(new) == 1 and cos[0] > 0.999
    with torch.no_grad():  # a model that always predicts its input's normalized value: a repeat
        for p in model.parameters():
            p.zero_()
        model.postnet.bias.copy_(model.normalizer.normalize(prompt[-1]))
    [(new, _, reason)] = generate(model, [prompt], -prompt[-1], 10, stop_end=0.0, stop_repeat=0.9)
    assert reason == "repeat" and len(new) == 1
    [(new, _, reason)] = generate(model, [prompt], -prompt[-1], 5, stop_end=0.0, stop_repeat=0.0)
    assert reason == "max_new_concepts" and len(new) == 5

def test_noise_gives_varied_samples_and_none_is_deterministic():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    prompt, eot = torch.randn(2, 16), torch.randn(16)
    g = torch.Generator().manual_seed(1)
    a, b = (generate(model, [prompt], eot, 4, generators=[g], noise=0.5, **NO_STOP)[0][0] for _ in range(2))
    c, d = (generate(model, [prompt], eot, 4, generators=[g], **NO_STOP)[0][0] for _ in range(2))
    assert not torch.allclose(a, b) and torch.equal(c, d)

def test_generation_feeds_back_what_feed_returns_and_raw_feedback_appends_the_predictions():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    prompt, eot = torch.randn(3, 16), torch.randn(16)
    decoded = torch.randn(4, 16)
    seen = []

    def feed(rows, z):
        assert rows == [0] and z.shape == (1, 16)
        seen.append(z[0])
        return decoded[len(seen) - 1][None]
    [(new, _, _)] = generate(model, [prompt], eot, 4, feed, **NO_STOP)
    assert torch.equal(new, decoded)
    # each prediction came from the context of the fed-back concepts, not of the raw ones
    with torch.no_grad():
        for i, z in enumerate(seen):
            pred = model(torch.cat([prompt, decoded[:i]])[None])[0][0, -1]
            assert torch.allclose(z, model.normalizer.denormalize(pred), atol=1e-5)
    # raw: each prediction is appended as it is, as a loop over the whole window computes it
    [(new, _, _)] = generate(model, [prompt], eot, 4, **NO_STOP)
    assert torch.allclose(new, recomputed(model, prompt, 4), atol=1e-5)

def test_generation_stops_where_a_fixed_pattern_ends_the_text_and_not_before():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    a, b, eot = torch.tensor(rng.normal(size=(3, 16)), dtype=torch.float32)
    rot = torch.tensor(np.linalg.qr(rng.normal(size=(16, 16)))[0], dtype=torch.float32)

    def doc():  # a chain of rotations of random length, then a and b end the text
        chain = [torch.tensor(rng.normal(size=16), dtype=torch.float32)]
        for _ in range(rng.integers(1, 7)):
            chain.append(rot @ chain[-1])
        return torch.stack(chain + [a, b, eot])
    model = BaseLCM(tiny_config(block_size=12))
    offsets = train_toy(model, [doc() for _ in range(200)], steps=150)
    model.eval()
    _, prior = datafiles.stop_prior(offsets, None, len(model.stop_prior))
    model.stop_prior.copy_(torch.from_numpy(prior))
    x = torch.tensor(rng.normal(size=16), dtype=torch.float32)
    chain = torch.stack([x, rot @ x, rot @ rot @ x])
    # the cosine to end of text is off: the stop head stops it, right after b
    prompt = torch.cat([chain, a[None]])
    [(new, _, reason)] = generate(model, [prompt], eot, 6, since=len(prompt), stop_eot=2.0, stop_end=0.5)
    assert reason == "stop head" and len(new) == 2 and torch.dist(new[0], b) < 0.2 * b.norm()
    # before the pattern it goes on, though texts this long often end: it stops right after b, if
    # it comes to the pattern at all
    [(new, _, reason)] = generate(model, [chain], eot, 8, since=len(chain), stop_eot=2.0, stop_end=0.5)
    after_b = [i + 1 for i, n in enumerate(new) if torch.dist(n, b) < 0.2 * b.norm()]
    assert after_b == [len(new) - 1] if reason == "stop head" else not after_b

@pytest.mark.parametrize("model_type", ["baselcm", "one_tower", "two_tower"])
def test_a_batch_of_texts_gives_the_texts_of_one_text_at_a_time(model_type, tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(8, 16)).astype(np.float32) for _ in range(8)]
    bank = SentenceBank(str(tmp_path / "bank"), write_dataset(tmp_path, "bank", docs[:6], docs[6:],
                                                              docs[0][-1]))
    model = tiny_model(model_type).eval()
    with torch.no_grad():  # a stop head that ends each text after its own number of sentences
        torch.nn.init.normal_(model.stop.weight, std=3.0)
        model.stop_prior.fill_(-2.0)
    sampling = {} if model_type == "baselcm" else {"ddim_steps": 4}
    # texts of two lengths: each length advances as one batch
    prompts = [torch.randn(n, 16) for n in (3, 3, 5, 3, 5, 3)]
    eot = torch.randn(16)

    def write(texts):
        said = Transcript(decoder(None, bank), [[] for _ in texts])
        generators = [torch.Generator().manual_seed(i) for i in texts]
        out = generate(model, [prompts[i] for i in texts], eot, 6, said, generators, stop_end=0.9, **sampling)
        return said.texts, [reason for _, _, reason in out]
    together = write(range(6))
    alone = [write([i]) for i in range(6)]
    assert together == ([t[0] for t, _ in alone], [r[0] for _, r in alone])
    # they ended at different lengths, some by the stop head
    assert len({len(t) for t in together[0]}) > 1 and "stop head" in together[1]
