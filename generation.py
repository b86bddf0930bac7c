"""
Generation, as sample.py and the evaluation run it: a model continues texts concept by concept, each
prediction decoded at once and its sentence's concept fed back (Transcript), until a rule says the
text has ended. Texts of one length advance together, one batch a step; the Base-LCM keeps its keys
and values (a KV cache), a diffusion LCM samples each concept against the whole window.
"""
import torch
from torch.nn import functional as F

# where a text ends (sample.py's defaults and the evaluation's): at a prediction within cosine
# STOP_EOT of end of text ("eot"); once the stop head says it has ended by now with probability
# STOP_END (0.5: its median length; "stop head"); at a new concept within cosine STOP_REPEAT of one
# in the context ("repeat"; real text never comes closer than 0.85); at max_new concepts
STOP_EOT = 0.9
STOP_END = 0.5
STOP_REPEAT = 0.95

class Transcript:
    """What generate feeds back: each new concept decoded at once, its sentence kept"""

    def __init__(self, decode, avoid, feedback="decoded"):
        self.decode = decode
        self.avoid = avoid
        self.feedback = feedback
        self.texts = [[] for _ in avoid]
        self.sims = [[] for _ in avoid]
        self.concepts = [[] for _ in avoid]

    def __call__(self, rows, z):
        """rows: the texts of the predictions z (n, d_emb) -> the concepts their contexts take"""
        texts, sims, back = self.decode(z, [list(self.avoid[i]) + self.texts[i] for i in rows])
        for i, text, sim, concept in zip(rows, texts, sims, back):
            self.texts[i].append(text)
            self.sims[i].append(sim)
            self.concepts[i].append(concept)
        return torch.as_tensor(back, device=z.device) if self.feedback == "decoded" else z

@torch.no_grad()
def generate(model, prompts, eot, max_new, feed=None, generators=None, since=0, stop_eot=STOP_EOT,
             stop_end=STOP_END, stop_repeat=STOP_REPEAT, progress=None, **sampling):
    """prompts (T_i, d_emb) -> per text: (new concepts, their cosines to eot, stop rule)"""
    out = [None] * len(prompts)
    c = model.config
    # a diffusion model samples each concept against the whole window; the Base-LCM keeps a KV cache
    cached = not hasattr(model, "denoise")
    for length in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        seq = torch.stack([prompts[i] for i in rows]).float()  # (b, T, d_emb)
        new = {i: ([], []) for i in rows}  # each text's concepts and their cosines to eot
        ended = torch.zeros(len(rows), device=seq.device)  # P(the text has ended by now)
        # a tensor per layer, updated in place (compiled, a slice of a big one is copied whole)
        shape = (2, len(rows), c.n_head, c.block_size, c.n_embd // c.n_head)
        cache = [seq.new_zeros(shape) for _ in model.blocks] if cached else None
        start = 0  # where the window starts in seq
        in_cache = 0  # rows of the window already in the cache
        for step in range(max_new):
            if seq.size(1) - start > c.block_size:
                # the window slides by half its length; the cache starts again
                start = seq.size(1) - c.block_size // 2
                in_cache = 0
            # the rows not in the cache yet, at their positions in the window
            kv = {"cache": cache, "pos": torch.arange(in_cache, seq.size(1) - start, device=seq.device)}
            z = torch.stack([torch.randn(1, seq.size(2), device=seq.device,
                                         generator=generators[i] if generators else None) for i in rows])
            pred, stop = model.predict(seq[:, start + in_cache:], last=True, z=z, **kv if cached else {},
                                       **sampling)
            in_cache = seq.size(1) - start if cached else 0
            pred = pred[:, 0]
            cos = F.cosine_similarity(pred, eot[None], dim=-1)
            # the stop head's odds times the odds that the training texts end after as many sentences
            prior = model.stop_prior[min(since + step, len(model.stop_prior) - 1)]
            ended = 1 - (1 - ended) * (1 - torch.sigmoid(stop[:, 0] + prior))
            # the rules, in the order they are told; the first two end a text before its concept is fed
            rules = {"eot": cos >= stop_eot, "stop head": (ended >= stop_end) & (stop_end > 0)}
            going = ~(rules["eot"] | rules["stop head"])
            if feed is not None and going.any():
                pred[going] = feed([i for i, g in zip(rows, going) if g], pred[going])
            near = F.cosine_similarity(pred[:, None], seq[:, start:], dim=-1).amax(1)
            rules["repeat"] = (near >= stop_repeat) & (stop_repeat > 0)
            rules["max_new_concepts"] = torch.full_like(going, step == max_new - 1)
            seq = torch.cat([seq, pred[:, None]], 1)
            keep = []
            for j, i in enumerate(rows):
                new[i][0].append(pred[j])
                new[i][1].append(cos[j].item())
                reason = next((rule for rule, hit in rules.items() if hit[j]), None)
                if reason:
                    out[i] = (torch.stack(new[i][0]), new[i][1], reason)
                else:
                    keep.append(j)
            if progress:
                progress(len(rows) - len(keep))
            if not keep:
                break
            if len(keep) < len(rows):
                # the texts that go on
                rows = [rows[j] for j in keep]
                seq = seq[keep]
                ended = ended[keep]
                cache = [layer[:, keep] for layer in cache] if cached else None
    return out
