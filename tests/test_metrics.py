"""
The paper's metrics (metrics.py): l2, CA, PAR and MI by hand, continuation closeness, four samples of
a prompt, and the ROUGE of generated answers against their baselines.
"""
import copy

import numpy as np
import torch

import baselcm, concepts, metrics
from metrics import concept_metrics, finish_metrics

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
    # 1.4 vs 1: all 4 distractors (3, 10, 20, 30) further; 2.9 vs 2: its neighbours 1 and 3 are left
    # out, 3 of 3; 1.2 vs 3: 1 (not a neighbour) is closer, 3 of 4; window 1 is exact: 4 + 3 + 4
    # hits. The official variant takes only the other document's 3 targets: 18 of 18.
    assert r["ca"] == 21 / 22 and r["ca_doc"] == 1.0

def test_par_is_the_max_cosine_to_the_context_of_prediction_over_truth():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # the context grows: [x0], then [x0, x1]
    y = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # max cos to the context: 1/sqrt(2) both times
    pred = torch.tensor([[[1.0, 0.0], [3.0, 1.0]]])  # max cos: 1, then 3/sqrt(10)
    r = finish_metrics(concept_metrics(pred, x, y, torch.ones(1, 2, dtype=torch.bool),
                                       baselcm.Normalizer(2), *window_ids(1, 2)))
    assert abs(r["par"] - (1 + 3 / 10 ** 0.5) / (2 / 2 ** 0.5)) < 1e-6

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

def test_closeness_is_the_mean_of_each_generated_concepts_best_cosine_to_the_real_ones():
    generated = [[1.0, 0.0], [0.0, 2.0]]
    real = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert abs(metrics.closeness(generated, real) - (1 + 0.5 ** 0.5) / 2) < 1e-6

class Said:
    """A generation's result as write returns it: each text's sentences, concepts and stop reason."""

    def __init__(self, texts, concepts, stops):
        self.texts = texts
        self.concepts = concepts
        self.stops = stops

def test_answers_are_scored_by_rouge_against_lead_k_a_random_answer_and_the_decoders_best():
    texts = ["P1 alpha beta.", "P2 gamma delta.", "[MODEL]:", "The cat sat on the mat.", concepts.EOT_TEXT]
    rows = np.eye(5, 4, dtype=np.float32)

    def write(prompts, since, feedback, repeats, seed):  # one sentence, then the end
        [(prompt, sentences)] = prompts
        assert torch.equal(prompt, torch.as_tensor(rows[:3])) and sentences == texts[:3] and since == 0
        return Said([["The cat sat."]], [[np.zeros(4)]], ["stop head"])
    nearest = lambda c: (["The cat sat on a mat."] * len(c), np.zeros((len(c), 4)))
    train_texts = ["Q1.", "[MODEL]:", "A dog ran.", concepts.EOT_TEXT]
    r = metrics.answers(write, rows, np.array([0, 5]), np.array([3]), texts, nearest, train_texts,
                        np.array([0, 4]), np.array([2]), 7, prompt_end="[MODEL]:")
    # by hand: reference "the cat sat on the mat", 6 tokens
    assert r["pairs"] == 1
    assert np.allclose([r["model"][m] for m in ("rouge1", "rouge2", "rougeL", "sentences")],
                       [2 / 3, 4 / 7, 2 / 3, 1])
    assert r["model"]["eot"] == 1
    assert np.allclose([r["decoder's best"][m] for m in ("rouge1", "rouge2", "rougeL")], [5 / 6, 3 / 5, 5 / 6])
    # lead-1 (the references' mean length): "P1 alpha beta."; the random answer: "A dog ran."
    assert r["lead-1"]["rouge1"] == 0 and r["lead-1"]["sentences"] == 1
    assert r["random answer"]["rouge1"] == 0 and r["random answer"]["sentences"] == 1

def drawing(fixed=False):
    """A stand-in generation: each text's next concepts are draws from the seed given (or, fixed, the
    same two vectors every time), named by their first coordinate; each ends after two sentences."""
    def write(prompts, since, feedback, repeats, seed):
        generator = torch.Generator().manual_seed(seed)
        concepts = [[torch.full((8,), i + 1.0) if fixed else torch.randn(8, generator=generator)
                     for i in range(2)] for _ in prompts]
        texts = [[f"{z[0]:.4f}" for z in c] for c in concepts]
        return Said(texts, [[z.numpy() for z in c] for c in concepts], ["stop head"] * len(prompts))
    return write

def test_four_samples_of_a_prompt_report_their_distinct_sentences_and_spread():
    rows = torch.randn(12, 8).numpy()
    offsets = np.array([0, 6, 12])  # two documents of 6 rows: 3 of prompt, 2 after, end of text
    texts = [f"t{i}" for i in range(12)]
    r = {}
    for fixed in (False, True):
        r[fixed] = metrics.continuations(drawing(fixed), rows, offsets, texts, rows, offsets)["4 samples"]
    assert r[False]["distinct"] == 1 and r[False]["spread"] > 0.5  # four draws, four texts
    assert r[True]["distinct"] == 0.25 and r[True]["spread"] < 1e-6  # one text, four times
    assert r[False]["samples"] == 2 and r[False]["sentences"] == 2 and r[False]["eot"] == 1
