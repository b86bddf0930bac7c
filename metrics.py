"""
The paper's metrics (section 2.4.1) on predictions in the encoder's space: l2, contrastive accuracy
(CA, and the official code's CA-doc), paraphrasing (PAR), round-trip l2 and MI; any predictor's on
the fixed validation windows; and generation scored against the real text: continuations by their
closeness, answers by ROUGE. They know no model: a predictor is a function, generation too. And
the peak FLOP/s that MFU divides by, measured on the device.
"""
import time

import numpy as np
import torch
from torch.nn import functional as F

@torch.no_grad()
def concept_metrics(pred, x, y, mask, normalizer, doc, row):
    """Sums over one batch of a predictor's pred (B, T, d_emb): loss, l2, CA, CA-doc, PAR"""
    pred = pred.float()
    x = x.float()
    y = y.float()
    err = (normalizer.normalize(pred) - normalizer.normalize(y)).pow(2).sum(-1)[mask]
    d_true = (pred - y).norm(dim=-1)  # (B, T)
    # (N, N): the truth of prediction i is closer than target j
    further = d_true[mask][:, None] < torch.cdist(pred[mask], y[mask])
    # equal targets (end of text) are no distractors
    t = torch.unique(y[mask], dim=0, return_inverse=True)[1]
    distinct = t[:, None] != t[None, :]
    d = doc[:, None].expand_as(mask)[mask]
    r = row[mask]
    same_doc = d[:, None] == d[None, :]
    paper = distinct & ~(same_doc & ((r[:, None] - r[None, :]).abs() <= 1))
    official = distinct & ~same_doc
    causal = torch.ones(x.size(1), x.size(1), dtype=torch.bool, device=x.device).tril()
    inputs = F.normalize(x, dim=-1).transpose(1, 2)

    def context_cos(a):
        # the cosine of each position to the closest of its context s <= t: (B, T)
        cos = (F.normalize(a, dim=-1) @ inputs).masked_fill(~causal, -1)
        return cos.amax(-1)[mask].sum().item()
    return {"n": mask.sum().item(), "loss": err.sum().item(), "l2": d_true[mask].sum().item(),
            "ca_hits": (further & paper).sum().item(), "ca_pairs": paper.sum().item(),
            "ca_doc_hits": (further & official).sum().item(), "ca_doc_pairs": official.sum().item(),
            "par_pred": context_cos(pred), "par_true": context_cos(y)}

def finish_metrics(sums):
    """Sums over batches -> the metrics (and rt_l2 and MI where they were measured)."""
    r = {"loss": sums["loss"] / sums["n"], "l2": sums["l2"] / sums["n"],
         "ca": sums["ca_hits"] / max(sums["ca_pairs"], 1),
         "ca_doc": sums["ca_doc_hits"] / max(sums["ca_doc_pairs"], 1),
         "par": sums["par_pred"] / sums["par_true"]}
    if "rt_l2" in sums:
        r["rt_l2"], r["near"] = sums["rt_l2"] / sums["n"], sums["near"] / sums["n"]
    if "mi_gain" in sums:
        r["mi"] = sums["mi_gain"] / max(sums["mi_tokens"], 1)
    return r

@torch.no_grad()
def coherence_mi(lm, tokenizer, texts, contexts):
    """MI's sums: log p(s | context) - log p(s) over the texts s, and their tokens"""
    gain = 0.0
    n_tokens = 0
    for text, context in zip(texts, contexts):
        target = tokenizer.encode(text + "\n")
        with_context = tokenizer.encode("\n" + "".join(c + "\n" for c in context))
        for prefix, sign in ((tokenizer.encode("\n"), -1), (with_context, 1)):
            # the context's end, if it is long
            prefix = prefix[-(lm.config.max_position_embeddings - len(target)):]
            ids = torch.tensor([prefix + target], device=lm.device)
            logp = lm(ids).logits[0, len(prefix) - 1:-1].float().log_softmax(-1)
            gain += sign * logp.gather(-1, ids[0, len(prefix):, None]).sum().item()
        n_tokens += len(target)
    return gain, n_tokens

def closeness(generated, real):
    """The mean over generated concepts (n, d_emb) of the max cosine to the real ones (m, d_emb)."""
    generated = torch.as_tensor(np.asarray(generated, dtype=np.float32))
    cos = F.normalize(generated, dim=-1) @ F.normalize(real, dim=-1).T
    return cos.amax(1).mean().item()

def continuations(write, rows, offsets, texts, train_rows, train_offsets, k=3):
    """Validation documents' first k sentences continued by write, against the real rest"""
    docs = [(lo, end) for lo, end in zip(offsets[:-1], offsets[1:] - 1) if end - lo >= k + 2]
    real = [torch.as_tensor(np.asarray(rows[lo:end], dtype=np.float32)) for lo, end in docs]
    prompts = [(x[:k], texts[lo:lo + k]) for x, (lo, _) in zip(real, docs)]
    n = len(prompts)
    # the decoded texts and four more of each prompt, each from its own draws, in one batch (a
    # Base-LCM's are the same); the predictions fed back (raw), retrieval repeating or not
    said = {"decoded": write(prompts * 5, k, "decoded", False, 0), "raw": write(prompts, k, "raw", False, 0),
            "raw, repeats": write(prompts, k, "raw", True, 0)}
    r = {}
    for mode, s in said.items():
        kept = [(t, c, x[k:]) for t, c, x in zip(s.texts, s.concepts, real) if t]
        r[mode] = {"closeness": np.mean([closeness(c, x) for _, c, x in kept]),
                   "distinct": np.mean([len(set(t)) / len(t) for t, _, _ in kept]),
                   "samples": len(kept)} | lengths(s.texts[:n], s.stops[:n])
    off = ~torch.eye(4, dtype=torch.bool)
    kept = []
    for i, x in enumerate(real):
        four = [(said["decoded"].texts[i + j * n], said["decoded"].concepts[i + j * n]) for j in range(1, 5)]
        if all(t for t, _ in four):
            sentences = [s for t, _ in four for s in t]
            first = F.normalize(torch.as_tensor(np.stack([c[0] for _, c in four])), dim=-1)
            kept.append((np.mean([closeness(c, x[k:]) for _, c in four]), len(set(sentences)) / len(sentences),
                         max(0.0, 1 - (first @ first.T)[off].mean().item())))
    m = np.mean(np.reshape(kept, (-1, 3)), axis=0)
    r["4 samples"] = dict(zip(("closeness", "distinct", "spread"), m), samples=len(kept)) | \
        lengths(said["decoded"].texts[n:], said["decoded"].stops[n:])
    rng = np.random.default_rng(0)
    train_eot = set(train_offsets[1:] - 1)
    picks = [[i for i in rng.integers(0, len(train_rows), 16) if i not in train_eot][:8] for _ in real]
    r["random"] = [closeness(train_rows[np.sort(p)], x[k:]) for p, x in zip(picks, real)]
    r["repeat last"] = [closeness(x[k - 1:k], x[k:]) for x in real]
    for name in ("random", "repeat last"):
        r[name] = {"closeness": np.mean(r[name]), "samples": len(real)}
    rest = [len(x) - k for x in real]
    r["real"] = {"sentences": np.mean(rest), "median": np.median(rest)}
    return {name: {key: v if key == "samples" else float(v) for key, v in m.items()} for name, m in r.items()}

def answers(write, rows, offsets, starts, texts, nearest, train_texts, train_offsets, train_starts,
            cut, prompt_end=""):
    """Prompt -> answer pairs: each answer written from its prompt, scored by ROUGE"""
    from rouge_score.rouge_scorer import RougeScorer
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, split_summaries=True)
    rng = np.random.default_rng(0)
    # (where its prompt starts, where its answer starts, its end of text), pairs with an answer
    pairs = [(lo, a, end - 1) for lo, a, end in zip(offsets[:-1], starts, offsets[1:]) if end - 1 > a]
    k = max(1, round(np.mean([end - a for _, a, end in pairs])))
    train = [(a, end - 1) for a, end in zip(train_starts, train_offsets[1:]) if end - 1 > a]
    prompts = [(torch.as_tensor(np.asarray(rows[max(lo, a - cut):a], np.float32)), texts[lo:a])
               for lo, a, _ in pairs]
    said = write(prompts, 0, "decoded", False, 0)
    scores = {name: [] for name in ("model", f"lead-{k}", "random answer", "decoder's best")}
    for (lo, a, end), answer in zip(pairs, said.texts):
        picked = train[rng.integers(len(train))]
        reference = torch.as_tensor(np.asarray(rows[a:end], np.float32))
        candidates = {"model": answer, f"lead-{k}": [t for t in texts[lo:a] if t != prompt_end][:k],
                      "random answer": train_texts[picked[0]:picked[1]],
                      "decoder's best": nearest(reference)[0]}
        for name, sents in candidates.items():
            r = scorer.score(" ".join(texts[a:end]), " ".join(sents))
            scores[name].append([r[m].fmeasure for m in ("rouge1", "rouge2", "rougeL")] + [len(sents)])
    r = {name: dict(zip(("rouge1", "rouge2", "rougeL", "sentences"), np.mean(v, 0).tolist()))
         for name, v in scores.items()}
    r["model"] |= lengths(said.texts, said.stops)
    real = [end - a for _, a, end in pairs]
    return r | {"pairs": len(pairs), "real": {"sentences": np.mean(real), "median": np.median(real)}}

def lengths(texts, stops):
    """Texts and their stop rules -> sentences (mean, median), the share ended at end of text"""
    n = [len(t) for t in texts]
    return {"sentences": np.mean(n), "median": np.median(n),
            "eot": np.mean([s in ("eot", "stop head") for s in stops])}

def baselines(mean):
    """The paper's two baselines as predictors (x, y) -> predictions: copy the last concept;
    predict the training mean"""
    return {"copy": lambda x, y: x, "mean": lambda x, y: mean.expand_as(x)}

def predictor(model, ctx, **sampling):
    """A model as a predictor (x, y) -> next concepts, y unread; draws seeded: evaluations repeat"""
    def predict(x, y=None):
        z = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(0), device=x.device)
        with ctx:
            return model.predict(x, z=z, **sampling)[0].float()
    return predict

@torch.no_grad()
def evaluate(predictors, batches, normalizer, more=None):
    """Teacher-forced metrics of each predictor (name -> (x, y) -> predictions) over batches"""
    sums = {}
    for x, y, mask, _, doc, row in batches:
        for name, predict in predictors.items():
            p = predict(x, y)
            m = concept_metrics(p, x, y, mask, normalizer, doc, row)
            m |= more(p, y, mask, doc, row) if more else {}
            sums[name] = {k: sums.get(name, {}).get(k, 0) + v for k, v in m.items()}
    return {name: finish_metrics(s) for name, s in sums.items()}

def synchronize(device):
    if torch.device(device).type in ("cuda", "mps"):
        getattr(torch, torch.device(device).type).synchronize()

def measure_peak_flops(device, dtype, seconds=0.3):
    """FLOP/s of F.linear in dtype, measured here and now: the MFU denominator"""
    best = 0.0
    for n in (4096, 8192) if torch.device(device).type == "cuda" else (512, 1024, 2048):
        # ones, not random numbers: training's RNG stays untouched
        a = torch.ones(n, n, device=device, dtype=dtype)
        F.linear(a, a)
        synchronize(device)
        reps, t = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t < seconds:
            F.linear(a, a)
            reps += 1
            synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best
