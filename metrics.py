"""
The paper's metrics (section 2.4.1) on predictions in the encoder's space: l2, contrastive accuracy
(CA, and the official code's CA-doc), paraphrasing (PAR), round-trip l2 and MI; evaluation of any
predictor on the fixed validation windows, and the report of `train.py --eval_only=True`.
"""
import json, os

import numpy as np
import torch
from torch.nn import functional as F

from common import die, first_line
from concepts import SentenceBank, Transcript, decoder, load_encoder, roundtrip
from datafiles import load_split, same_space
from diffusion import DiffusionLCM

@torch.no_grad()
def concept_metrics(pred, x, y, mask, normalizer, doc, row):
    """Sums over one batch for a predictor. pred, x (inputs), y (targets): (B, T, d_emb); mask (B,
    T); doc (B,) the document of each window and row (B, T) the row of each target, to find a
    target's neighbours. loss: the training loss. l2: the distance to the true next concept. ca:
    contrastive accuracy as in the paper: against the batch's other targets but the truth's
    neighbours in its document. ca_doc: as in the official code, against other documents' targets.
    par: the mean max cosine to the context of the predictions over that of the true next concepts
    (a ratio of means: a per-prediction ratio explodes where the truth's is near 0)."""
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
    """MI as sums: (log p(s | its context sentences) - log p(s), summed over the texts s; their
    length in tokens); MI is the first over the second. A newline starts and ends a text
    (official)."""
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

@torch.no_grad()
def generations(model, prompts, eot, decode, sampling, since=0, feedback="decoded", seed=0, n=8,
                stop_eot=0.9, stop_repeat=0.95, stop_end=0.5):
    """As sample.py generates: after each prompt, (its concepts (T, d_emb), its sentences), up to
    n sentences decoded as they come (decode: concepts.decoder's) and fed back, with sample.py's
    stops (the prompts hold since sentences of their texts); a diffusion model's draws from a seeded
    generator (seed). -> a Transcript of each (.stop)."""
    generator = torch.Generator(eot.device).manual_seed(seed)
    said = []
    for concepts, texts in prompts:
        said.append(Transcript(decode, texts, feedback))
        said[-1].stop = model.generate(concepts.to(eot.device), n, eot, stop_eot, stop_repeat,
                                       feed=said[-1], stop_end=stop_end, since=since,
                                       generator=generator, **sampling)[2]
    return said

def continuations(model, rows, offsets, texts, eot, decoders, train_rows, train_offsets, sampling,
                  k=3):
    """Generation against the real text: the first k sentences of each validation document of at
    least k + 2 are the prompt (generations), decoded sentences or raw predictions fed back;
    decoders: repeats -> decode. -> name -> closeness (above) of the generated sentences to the
    document's real rest, the share of distinct sentences per sample, the sentences generated (mean
    and median) and the share that ended at end of text; "real": the real rest's length. "4 samples":
    four continuations of each prompt, each from its own draws: their closeness, the share of
    distinct sentences among all four, the mean cosine distance between their first concepts.
    Baselines: 8 random training sentences; the prompt's last, repeated."""
    docs = [(lo, end) for lo, end in zip(offsets[:-1], offsets[1:] - 1) if end - lo >= k + 2]
    real = [torch.as_tensor(np.asarray(rows[lo:end], dtype=np.float32)) for lo, end in docs]
    prompts = [(r[:k], texts[lo:lo + k]) for r, (lo, _) in zip(real, docs)]
    r = {}
    for mode in ("decoded", "raw", "raw, repeats"):
        decode = decoders(mode == "raw, repeats")
        said = generations(model, prompts, eot, decode, sampling, k, mode.split(",")[0])
        kept = [(s, x[k:]) for s, x in zip(said, real) if s.texts]
        r[mode] = {"closeness": np.mean([closeness(s.concepts, x) for s, x in kept]),
                   "distinct": np.mean([len(set(s.texts)) / len(s.texts) for s, _ in kept]),
                   "samples": len(kept)} | lengths(said)
    # four continuations of each prompt, each from its own draws (a Base-LCM's are the same)
    runs = [generations(model, prompts, eot, decoders(False), sampling, k, seed=s) for s in range(1, 5)]
    off = ~torch.eye(4, dtype=torch.bool)

    def four(said, x):
        texts = [t for s in said for t in s.texts]
        first = F.normalize(torch.as_tensor(np.stack([s.concepts[0] for s in said])), dim=-1)
        return (np.mean([closeness(s.concepts, x) for s in said]), len(set(texts)) / len(texts),
                max(0.0, 1 - (first @ first.T)[off].mean().item()))
    kept = [four(said, x[k:]) for said, x in zip(zip(*runs), real) if all(s.texts for s in said)]
    m = np.mean(np.reshape(kept, (-1, 3)), axis=0)
    r["4 samples"] = dict(zip(("closeness", "distinct", "spread"), m), samples=len(kept)) | \
        lengths(sum(runs, []))
    rng = np.random.default_rng(0)
    train_eot = set(train_offsets[1:] - 1)
    picks = [[i for i in rng.integers(0, len(train_rows), 16) if i not in train_eot][:8]
             for _ in real]
    r["random"] = [closeness(train_rows[np.sort(p)], x[k:]) for p, x in zip(picks, real)]
    r["repeat last"] = [closeness(x[k - 1:k], x[k:]) for x in real]
    for name in ("random", "repeat last"):
        r[name] = {"closeness": np.mean(r[name]), "samples": len(real)}
    r["real"] = {"sentences": np.mean([len(x) - k for x in real]), "median": np.median([len(x) - k for x in real])}
    return {name: {key: v if key == "samples" else float(v) for key, v in m.items()}
            for name, m in r.items()}

def answers(model, rows, offsets, starts, texts, eot, decode, nearest, train_texts, train_offsets,
            train_starts, sampling, prompt_end=""):
    """Prompt -> answer pairs, scored as the paper does: each validation answer (from the row
    starts) generated from its prompt's last block_size - 1 sentences (generations), joined with
    spaces and scored against the reference with Google's rouge-score: ROUGE-1, ROUGE-2 and ROUGE-L
    F-measure, no stemming. Baselines: lead-k, the prompt's first k sentences (k: the references'
    mean length); a random training answer; the decoder's best, the reference's own concepts decoded
    (nearest: concepts.roundtrip's). -> name -> the means of rouge1, rouge2, rougeL, sentences."""
    from rouge_score.rouge_scorer import RougeScorer
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, split_summaries=True)
    rng = np.random.default_rng(0)
    # (where its prompt starts, where its answer starts, its end of text), pairs with an answer
    pairs = [(lo, a, end - 1) for lo, a, end in zip(offsets[:-1], starts, offsets[1:])
             if end - 1 > a]
    k = max(1, round(np.mean([end - a for _, a, end in pairs])))
    train = [(a, end - 1) for a, end in zip(train_starts, train_offsets[1:]) if end - 1 > a]
    cut = model.config.block_size - 1
    prompts = [(torch.as_tensor(np.asarray(rows[max(lo, a - cut):a], np.float32)), texts[lo:a])
               for lo, a, _ in pairs]
    said = generations(model, prompts, eot, decode, sampling)
    scores = {name: [] for name in ("model", f"lead-{k}", "random answer", "decoder's best")}
    for (lo, a, end), s in zip(pairs, said):
        picked = train[rng.integers(len(train))]
        reference = torch.as_tensor(np.asarray(rows[a:end], np.float32))
        candidates = {"model": s.texts, f"lead-{k}": [t for t in texts[lo:a] if t != prompt_end][:k],
                      "random answer": train_texts[picked[0]:picked[1]],
                      "decoder's best": nearest(reference)[0]}
        for name, sents in candidates.items():
            r = scorer.score(" ".join(texts[a:end]), " ".join(sents))
            rouge = [r[m].fmeasure for m in ("rouge1", "rouge2", "rougeL")]
            scores[name].append(rouge + [len(sents)])
    r = {name: dict(zip(("rouge1", "rouge2", "rougeL", "sentences"), np.mean(v, 0).tolist()))
         for name, v in scores.items()}
    r["model"] |= lengths(said)
    real = [end - a for _, a, end in pairs]
    return r | {"pairs": len(pairs), "real": {"sentences": np.mean(real), "median": np.median(real)}}

def lengths(said):
    """Generations (Transcripts) -> the mean and median of their sentences, and the share that
    stopped at end of text (not by a repeat, nor by the cap)."""
    n = [len(s.texts) for s in said]
    return {"sentences": np.mean(n), "median": np.median(n), "eot": np.mean([s.stop == "eot" for s in said])}

def baselines(mean):
    """The paper's two baselines as predictors: copy the last concept; predict the training mean."""
    return {"copy": lambda x: x, "mean": lambda x: mean.expand_as(x)}

def predictor(model, ctx, **sampling):
    """The model as a predictor of the next concept at every position, in the encoder's space:
    (B, T, d_emb) -> (B, T, d_emb). Its draws (a diffusion model's) come from a seeded generator, so
    that evaluations are repeatable and training's own random state stays untouched."""
    def predict(x):
        generator = torch.Generator(x.device).manual_seed(0)
        with ctx:
            pred, _ = model.predict(x, generator=generator, **sampling)
        return model.normalizer.denormalize(pred.float())
    return predict

@torch.no_grad()
def validate(model, ctx, batches):
    """train.py's periodic evaluation: {"model": metrics} of the model's next-concept prediction, as
    evaluate scores the baselines'. A diffusion model's: its conditional mean (one denoising step
    from pure noise, no guidance), one forward pass; and its own loss on the held-out windows, the
    denoising loss (seeded), as "denoising", which chooses the best checkpoint."""
    model.eval()
    batches = list(batches)
    diffusion = isinstance(model, DiffusionLCM)
    mean = {"ddim_steps": 1, "guidance": 1.0} if diffusion else {"guidance": 1.0}
    r = evaluate({"model": predictor(model, ctx, **mean)}, batches, model.normalizer)
    if diffusion:
        total = 0.0
        n = 0
        generator = torch.Generator(batches[0][0].device).manual_seed(0)
        for x, y, mask, _, _, _ in batches:
            with ctx:
                _, loss = model(x, y, mask, generator=generator)
            total += loss.item() * mask.sum().item()
            n += mask.sum().item()
        r["model"]["denoising"] = total / n
    model.train()
    return r

def scores(r):
    """An evaluation in a line, for the training log."""
    model = r["model"]
    denoising = f", denoising loss {model['denoising']:.2f}" if "denoising" in model else ""
    return (f"val loss {model['loss']:.2f} (copy {r['copy']['loss']:.2f}, mean "
            f"{r['mean']['loss']:.2f}), l2 {model['l2']:.4f}, CA {100 * model['ca']:.1f}%{denoising}")

@torch.no_grad()
def evaluate(predictors, batches, normalizer, roundtrip=None, mi=None):
    """Teacher-forced next-concept metrics for each predictor, name -> function x -> predictions
    (B, T, d_emb) in the encoder's space, over batches from datafiles.eval_batches.
    roundtrip: predictions (n, d_emb) -> (their texts, the texts' concepts), for rt_l2 and near, the
    cosine of a prediction to its round trip (concepts.roundtrip).
    mi: (causal LM, its tokenizer, the split's sentences, its offsets), for MI on those texts."""
    sums = {}
    for x, y, mask, _, doc, row in batches:
        if mi:
            # each target's context: the previous 10 sentences of its document (paper: k = 10)
            lm, tokenizer, sentences, offsets = mi
            starts = offsets[doc.cpu().numpy()][:, None].repeat(x.size(1), 1)[mask.cpu().numpy()]
            contexts = [sentences[max(lo, r - 10):r] for lo, r in zip(starts, row[mask].tolist())]
        for name, predict in predictors.items():
            p = predict(x)
            m = concept_metrics(p, x, y, mask, normalizer, doc, row)
            if roundtrip:
                texts, back = roundtrip(p[mask].float())
                back = torch.as_tensor(back, device=y.device)
                m["rt_l2"] = (back - y[mask]).norm(dim=-1).sum().item()
                # how close the prediction lies to a real sentence (retrieval: the nearest one)
                m["near"] = F.cosine_similarity(back, p[mask].float(), dim=-1).sum().item()
            if mi:
                m["mi_gain"], m["mi_tokens"] = coherence_mi(lm, tokenizer, texts, contexts)
            sums[name] = {k: sums.get(name, {}).get(k, 0) + v for k, v in m.items()}
    return {name: finish_metrics(s) for name, s in sums.items()}

def eval_report(model, ctx, sampling, baselines, batches, data_dir, meta, ckpt, out_dir, sonar_hf,
                mi_model="", generate=0):
    """train.py --eval_only=True: prints every metric for the model (sampling: its sampler's
    settings) and the baselines, the predictions decoded to text (SONAR's decoder, else retrieval of
    the nearest training sentence) and encoded again, and the continuations (or, on prompt -> answer
    pairs, the answers and their ROUGE), for the first generate validation texts (0 = all); writes
    them to out_dir/eval.json. ckpt: the model's."""
    device = model.normalizer.center.device
    enc = None
    bank = None
    decoded_by = "SONAR's decoder"
    # either implementation of SONAR decodes
    if same_space(meta["encoder"], "sonar"):
        enc = load_encoder(meta["encoder"], device, sonar_hf)
    else:
        bank = SentenceBank(data_dir, meta)
        decoded_by = "retrieval of the nearest training sentence"
    nearest = roundtrip(enc, bank, meta["lang"])
    sentences = open(os.path.join(data_dir, "val.txt"), encoding="utf-8").read().splitlines()
    rows, offsets, starts = load_split(data_dir, "val", meta)
    mi = None
    if mi_model:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(mi_model)
            lm = AutoModelForCausalLM.from_pretrained(mi_model).to(device).eval()
        except OSError as e:
            die(f"cannot load --mi_model={mi_model} ({first_line(e)}): name a causal LM "
                "such as gpt2 (downloads once) or a local folder")
        mi = (lm, tokenizer, sentences, offsets)
    batches = list(batches)
    windows = sum(len(b[0]) for b in batches)
    predictors = {"model": predictor(model, ctx, **sampling)} | baselines
    results = evaluate(predictors, batches, model.normalizer, nearest, mi)
    iter_num = ckpt["iter_num"]
    trained_on = ckpt["data"]["dir"]
    where = "" if os.path.abspath(data_dir) == trained_on else f" (trained on {trained_on})"
    print(f"{windows} validation windows, {meta['val_docs']} documents of {data_dir}, iter "
          f"{iter_num}{where}; decoded text: {decoded_by}"
          + (f"; MI with {mi_model}" if mi_model else ""))
    mi_column = "      MI" if mi_model else ""
    print(f"{'':8}    loss       l2    rt_l2    near      CA  CA-doc     PAR{mi_column}")
    for name, r in results.items():
        print(f"{name:8}{r['loss']:10.2f}{r['l2']:9.4f}{r['rt_l2']:9.4f}{r['near']:8.3f}"
              f"{100 * r['ca']:7.1f}%{100 * r['ca_doc']:7.1f}%{r['par']:8.3f}"
              + (f"{r['mi']:8.3f}" if mi_model else ""))
    train_rows, train_offsets, train_starts = load_split(data_dir, "train", meta)
    eot = torch.tensor(meta["eot"], device=device)
    decoders = lambda repeats: decoder(enc, bank, meta["lang"], repeats)
    shown = offsets[:generate + 1] if generate else offsets
    if starts is None:
        kind = "continuations"
        gen = continuations(model, rows, shown, sentences, eot, decoders, train_rows, train_offsets,
                            sampling)
        real = gen.pop("real")
        print(f"continuations of {gen['random']['samples']} validation documents (prompt: 3 "
              f"sentences, up to 8 generated; the real rest: {real['sentences']:.1f} sentences, median "
              f"{real['median']:.0f}): closeness to the real rest, sentences (mean, median), distinct "
              "share, ended at end of text; 4 samples: the spread of their first concepts")
        for name, r in gen.items() if gen["random"]["samples"] else ():
            said = (f"{r['sentences']:6.1f}{r['median']:5.0f}{100 * r['distinct']:6.0f}%"
                    f"{100 * r['eot']:6.0f}%") if "distinct" in r else ""
            said += f"{r['spread']:8.3f}" if "spread" in r else ""
            print(f"{name:14}{r['closeness']:8.3f}{said}")
        gen["real"] = real
    else:
        # prompt -> answer pairs: the answers, scored by ROUGE
        kind = "answers"
        with open(os.path.join(data_dir, "train.txt"), encoding="utf-8") as f:
            train_texts = f.read().splitlines()
        gen = answers(model, rows, shown, starts, sentences, eot, decoders(False), nearest,
                      train_texts, train_offsets, train_starts, sampling, meta.get("prompt_end", ""))
        print(f"answers to {gen['pairs']} validation prompts (until end of text, up to 8 sentences; "
              f"the references: {gen['real']['sentences']:.1f} sentences, median "
              f"{gen['real']['median']:.0f}): ROUGE-1, ROUGE-2, ROUGE-L (F-measure, %), sentences "
              "(mean, median), ended at end of text")
        for name, r in list(gen.items())[:-2]:
            rouge = "".join(f"{100 * r[k]:7.2f}" for k in ("rouge1", "rouge2", "rougeL"))
            ended = f"{r['median']:5.0f}{100 * r['eot']:6.0f}%" if "eot" in r else ""
            print(f"{name:16}{rouge}{r['sentences']:6.1f}{ended}")
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({"iter": iter_num, "dataset": data_dir, "windows": windows, "decoded_by": decoded_by,
                   "mi_model": mi_model, "sampling": sampling, **results, kind: gen}, f, indent=1)
