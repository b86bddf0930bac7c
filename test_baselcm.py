"""
The Base-LCM (baselcm.py) as a specification: what it predicts from, its loss, its normalizer, its
stop head and guidance. The other features have a file each in tests/ (generation with the KV cache:
tests/test_generation.py); shared helpers live in conftest.py.
$ python -m pytest -q   (fast tests; -m slow for the end-to-end runs)
"""
import numpy as np
import torch

import baselcm, datafiles
from baselcm import BaseLCM
from conftest import tiny_config, train_toy
from datafiles import fit_normalizer, get_batch, sample_windows

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
    x, y, mask, _ = get_batch(rows, starts, ends, first, 12)
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







def test_the_stop_head_learns_beside_the_model_without_changing_it():
    docs = [torch.randn(int(n), 16) for n in np.random.default_rng(1).integers(3, 12, 100)]
    trained = []
    for stop_head in (True, False):
        torch.manual_seed(0)
        model = BaseLCM(tiny_config())
        train_toy(model, docs, steps=20, stop_head=stop_head)
        trained.append(model)
    with_head, without = (dict(m.named_parameters()) for m in trained)
    # the same transformer to the last bit; only the stop head learnt (from its zeros)
    assert all(torch.equal(p, without[k]) for k, p in with_head.items() if not k.startswith("stop."))
    assert with_head["stop.weight"].abs().sum() > 0 and without["stop.weight"].abs().sum() == 0

def test_the_stop_head_learns_from_real_targets_only_not_padding_nor_prompts():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config())
    torch.nn.init.normal_(model.stop.weight)
    x, y = torch.randn(4, 12, 16), torch.randn(4, 12, 16)
    # real targets: an answer's rows, before the padding
    mask = (torch.arange(12) >= 3) & (torch.arange(12) < 9)
    eot = torch.arange(12).expand(4, 12) == 8
    _, loss = model(x, y, mask.expand(4, 12), eot)
    flipped = eot.clone()
    flipped[:, ~mask] = ~flipped[:, ~mask]
    assert torch.equal(model(x, y, mask.expand(4, 12), flipped)[1], loss)
    flipped[:, 8] = False
    assert model(x, y, mask.expand(4, 12), flipped)[1] != loss

def test_the_length_prior_is_the_log_odds_of_ending_after_each_count_of_sentences():
    # texts of 1, 2, 2 and 3 sentences (each then its end of text)
    offsets = np.cumsum([0, 2, 3, 3, 4])
    bias, prior = datafiles.stop_prior(offsets, None, 4)
    logit = lambda p: np.log(p / (1 - p))
    assert np.isclose(bias, logit(4 / 12))
    # after 0 sentences none ends; after 1, one of 4; after 2, two of 3; after 3, the last
    expected = [(0 + 0.5) / 5, (1 + 0.5) / 5, (2 + 0.5) / 4, (1 + 0.5) / 2]
    assert np.allclose(prior, logit(np.array(expected)) - bias)
    # pairs: a text is the answer, from its first row: answers of 0, 2, 2 and 3 sentences
    bias, prior = datafiles.stop_prior(offsets, np.array([1, 2, 5, 8]), 4)
    assert np.isclose(bias, logit(4 / 11)) and np.isclose(prior[0], logit(1.5 / 5) - logit(4 / 11))

def test_guidance_moves_the_prediction_away_from_the_training_mean_and_1_is_the_plain_model():
    torch.manual_seed(0)
    model = BaseLCM(tiny_config()).eval()
    model.normalizer.center.uniform_(-1, 1)
    model.normalizer.scale.uniform_(0.5, 2)
    model.normalizer.mean.normal_()
    x = torch.randn(3, 8, 16)
    plain = model(x)[0]
    assert torch.equal(model.predict(x, guidance=1.0)[0], model.normalizer.denormalize(plain))
    # the training mean, in the normalized space, is the prediction without context
    mean = model.normalizer.normalize(model.normalizer.mean)
    guided = model.normalizer.denormalize(mean + 2.5 * (plain - mean))
    assert torch.allclose(model.predict(x, guidance=2.5)[0], guided, atol=1e-5)
