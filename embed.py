"""
Turns a text dataset into concepts in the format train.py reads (datafiles.py): documents ->
sentences (spaCy) -> one embedding each (MiniLM, SONAR or any sentence-transformers model) ->
chunks on disk -> train and val files. Memory stays flat; a killed run continues where it stopped.

$ python embed.py                          # offline default: gensim's Lee news corpus, MiniLM
$ python embed.py --dataset=wikitext --hf_config=wikitext-103-raw-v1 --encoder=sonar --device=cuda
$ torchrun --nproc_per_node=8 embed.py --dataset=my_docs.jsonl --encoder=sonar   # a share per GPU
"""
import glob, itertools, os, sys, time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from common import (configure, die, end_distributed, first_line, get_device, init_distributed,
                    knobs, require, same_space, settings_of, start_work, writable_dir)
from concepts import EOT_TEXT, check_lang, load_encoder, sentence_splitter, split_sentences
from datafiles import chunks_to_do, finish_dataset, write_chunk, write_splits

dataset = "lee"          # 'lee' (offline default), a .txt .jsonl .json .csv .parquet file, a folder
                         # of them (a .txt file there is one document), or a hub dataset's name
hf_config = ""           # hub dataset config name, e.g. wikitext-103-raw-v1
hf_split = "train"       # hub dataset split
text_column = ""         # '' = 'text'; the official LCM parquet schema is detected
pairs = ""               # finetuning data: 'PROMPT,ANSWER' columns; a pair is one document, the
                         # prompt's sentences then the answer's (each text, or a list of sentences)
prompt_end = ""          # pairs: a sentence closing each prompt (the official recipe's: '[MODEL]:')
split_column = ""        # a column naming each row's split: train, or val (validation, test)
max_docs = 0             # 0 = all documents
name = ""                # output goes to data_root/name; '' = derived from dataset
data_root = "data"
encoder = "minilm"       # 'minilm' (offline), 'sonar', 'sonar_hf' (its transformers port), or a
                         # sentence-transformers model name
sonar_hf_encoder = ""    # SONAR's transformers port's encoder (hub name, folder); '' = docs/sonar.md's
lang = "eng_Latn"        # FLORES-200 code of the text (SONAR uses it)
spacy_model = ""         # '' = rule-based sentencizer; or an installed pipeline (en_core_web_sm)
max_chars = 256          # longer sentences are cut on word boundaries
val_fraction = 0.1       # share of documents held out for validation
seed = 1337              # the train/val split
dtype = "float16"        # storage of the embeddings: float16 or float32
chunk_docs = 256         # documents per chunk: the unit of streaming, resuming, sharing among ranks
batch_size = 128         # sentences per encoder call
device = ""              # '' = autodetect
norm_sample = 1_000_000  # at most this many train rows fit the normalizer
overwrite = False
defaults = {k: globals()[k] for k in knobs(globals())}
configure(globals(), sys.argv[1:])

# -----------------------------------------------------------------------------
# everything that can be checked before encoding is checked now
check_lang(lang)
require(dtype in ("float16", "float32"), f"--dtype={dtype} is not a storage type: use float16 or float32")
require(0 < val_fraction < 1, f"--val_fraction={val_fraction} must be between 0 and 1")
for k in ("batch_size", "chunk_docs", "max_chars", "norm_sample"):
    require(globals()[k] >= 1, f"--{k}={globals()[k]} must be at least 1")
require(max_docs >= 0, f"--max_docs={max_docs} must be 0 (all documents) or more")
require(not pairs or len(pairs.split(",")) == 2 and all(pairs.split(",")), f"--pairs={pairs}: name two "
        "columns, PROMPT,ANSWER")

def not_utf8(what, e):
    die(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start}): re-save it as UTF-8")

# the source: a file, all files of a folder in name order, or (no files) a hub dataset's name
READERS = {".txt": "text", ".cor": "text", ".jsonl": "json", ".json": "json", ".csv": "csv",
           ".parquet": "parquet"}
ext = lambda f: os.path.splitext(f)[1].lower()
source = dataset
if dataset == "lee":
    # ships inside gensim's wheel: 300 news documents, one per line
    from gensim.test.utils import datapath
    source = datapath("lee_background.cor")
files = [source]
if os.path.isdir(source):
    files = [f for f in sorted(glob.glob(os.path.join(source, "**", "*"), recursive=True)) if ext(f) in READERS]
    require(files, f"{source} holds no {', '.join(READERS)} files")
    require(len({READERS[ext(f)] for f in files}) == 1, f"{source} mixes "
            f"{' and '.join(sorted({ext(f) for f in files}))} files: use a folder of one kind")
elif os.path.isfile(source):
    require(ext(source) in READERS, f"cannot read {source}: use a {', '.join(READERS)} file, or a folder of them")
else:
    require(ext(source) not in READERS and not source.startswith((".", "/")), f"no such file or folder: {source}")
    files = []
default_name = os.path.splitext(os.path.basename(os.path.normpath(dataset)))[0].replace("/", "_")
out = os.path.join(data_root, name or default_name)
# what decides the output: every knob but these (SONAR is one space in either implementation). A
# dataset folder and its partial work are used again only for the same settings.
not_output = ("name", "data_root", "device", "batch_size", "overwrite", "sonar_hf_encoder")
settings = settings_of({k: globals()[k] for k in defaults if k not in not_output}, source, files)
device = get_device(device)
writable_dir(data_root, "data_root")
# with torchrun, each rank encodes on its own GPU; gloo only waits for the ranks to finish
rank, world, device = init_distributed(device, "gloo", timeout_hours=12)
ddp = torch.distributed.is_initialized()
key, work = start_work(out, settings, defaults, overwrite, rank)
if work is None:
    print(f"{out} is already built with these settings; pass --overwrite=True to rebuild it")
    sys.exit(0)
if ddp:
    torch.distributed.barrier()

# -----------------------------------------------------------------------------
# documents, streamed through Hugging Face datasets: a .txt file is a document a line (in a folder,
# a document a file), other formats hold rows with the columns named; nothing is loaded whole
import datasets
# its errors reach the user as our one line
datasets.logging.set_verbosity(datasets.logging.CRITICAL)
try:
    if files:
        kind = READERS[ext(files[0])]
        by_file = {"sample_by": "document"} if kind == "text" and os.path.isdir(source) else {}
        docs = datasets.load_dataset(kind, data_files=files, split="train", streaming=True, **by_file)
    else:
        docs = datasets.load_dataset(source, hf_config or None, split=hf_split, streaming=True)
    docs = iter(docs)
    first = next(docs, None)
except UnicodeDecodeError as e:
    not_utf8(dataset, e)
except Exception as e:
    # datasets raises many kinds for a bad name, a broken file or no network
    die(f"cannot {'read' if files else 'load dataset'} '{dataset}': {type(e).__name__}: {first_line(e, 1000)}"
        + ("" if files else " (check the name, config, network)"))
require(first is not None, f"dataset '{dataset}' has no documents")
docs = itertools.chain([first], docs)
# the official LCM parquet schema: sentences and their SONAR concepts, [prompt_sentences,] and
# text_sentences
official = [c for c in ("prompt_sentences", "text_sentences") if c in first] \
    if "text_sentences" in first and "text_sentences_sonar_emb" in first else []
columns = pairs.split(",") if pairs else [text_column or "text"]
for flag, names in {"pairs" if pairs else "text_column": columns, "split_column": [split_column]}.items():
    for c in names:
        # the official schema names its own columns of text
        require(not c or c in first or official and flag != "split_column", f"no column '{c}' in {dataset} "
                f"(columns: {', '.join(first)}): pass --{flag}=NAME")
if official and not same_space(encoder, "sonar"):
    print("official LCM parquet: its embeddings are SONAR's, so the encoder is sonar")
    encoder = "sonar"
docs = itertools.islice(docs, max_docs or None)
enc = load_encoder(encoder, device, (sonar_hf_encoder, ""))
# a full batch warms the encoder up
eot = enc.encode([EOT_TEXT] * batch_size, lang=lang, batch_size=batch_size)[0]
nlp = sentence_splitter(spacy_model)

def sentences(rows):
    """dataset rows -> each document's prompt (pairs) and text, as sentences (in a thread)"""
    cut = None if official else max_chars
    parts = [split_sentences(nlp, [r.get(c) for r in rows], cut) for c in official or columns]
    prompts = parts[0] if len(parts) == 2 else [[]] * len(rows)
    return [(p + [prompt_end] if p and prompt_end else p, t) for p, t in zip(prompts, parts[-1])]

def embed_chunk(rows, docs, progress):
    """-> (sentences, concepts, answer starts, held out, skipped); progress(sents, docs)"""
    kept = [(r, p, text) for r, (p, text) in zip(rows, docs) if text]
    sents = [p + text for _, p, text in kept]
    if official:
        # the concepts as given, prompt then text; only a closing sentence (--prompt_end) is
        # encoded here
        given = lambda r, c: np.asarray(r.get(c) or [], np.float32).reshape(-1, enc.d_emb)
        closing = [enc.encode([prompt_end], lang=lang)] if prompt_end else []
        emb = [np.concatenate([given(r, "prompt_sentences_sonar_emb")] + closing * (len(p) > 0)
                              + [given(r, "text_sentences_sonar_emb")]) for r, p, _ in kept]
        progress(sum(map(len, emb)), len(kept))
    else:
        flat = [s for doc in sents for s in doc]
        ends = np.cumsum([len(s) for s in sents])
        # a few batches at a time, so that progress shows on long documents too
        emb = []
        for at in range(0, len(flat), 8 * batch_size):
            emb.append(enc.encode(flat[at:at + 8 * batch_size], lang=lang, batch_size=batch_size))
            progress(len(emb[-1]), np.searchsorted(ends, at + len(emb[-1]), side="right"))
    emb = np.concatenate(emb + [np.zeros((0, enc.d_emb), np.float32)])
    # end of text closes each document
    emb = np.insert(emb, np.cumsum([len(s) for s in sents], dtype=np.int64), eot, axis=0)
    held_out = [str(r[split_column]).lower() in ("val", "validation", "test") if split_column else None
                for r, _, _ in kept]
    answers = [len(p) for _, p, _ in kept]
    return [s + [EOT_TEXT] for s in sents], emb.astype(dtype), answers, held_out, len(docs) - len(kept)

# chunk k belongs to rank k % world; a chunk already on disk is not encoded again
t0 = time.time()
n_docs = 0  # documents done, or passed over (on disk, or another rank's)
bar = tqdm(unit="sent", disable=rank != 0, desc=f"embed {out}", postfix={"docs": 0})

def docs_done(n):
    global n_docs
    n_docs += n

def progress(sentences, docs):
    # sentences encoded, and the documents of the chunk that they complete
    bar.update(sentences)
    bar.set_postfix(docs=n_docs + docs, refresh=False)

try:
    # chunk k + 1 is split into sentences while chunk k is encoded
    with ThreadPoolExecutor(1) as pool:
        todo = chunks_to_do(docs, chunk_docs, work, rank, world, docs_done)
        jobs = ((k, rows, pool.submit(sentences, rows)) for k, rows in todo)
        job = next(jobs, None)
        while job:
            k, rows, split = job
            job = next(jobs, None)
            sents, emb, answers, held_out, n_empty = embed_chunk(rows, split.result(), progress)
            write_chunk(work, rank, k, emb, sents, answers, held_out, n_empty)
            docs_done(len(rows))
            bar.set_postfix(docs=n_docs)
except UnicodeDecodeError as e:
    # streaming reads the file as it goes
    not_utf8(dataset, e)
bar.close()
if ddp:
    torch.distributed.barrier()
    if rank != 0:
        end_distributed()
        sys.exit(0)

# -----------------------------------------------------------------------------
# chunks -> train and val files (rank 0), then the normalizer, fitted on the training concepts
meta = write_splits(work, seed, val_fraction)
meta |= {"encoder": encoder, "impl": enc.impl, "d_emb": enc.d_emb, "lang": lang, "dtype": dtype,
         "dataset": dataset, "key": key, "settings": settings, "spacy_model": spacy_model,
         "max_chars": max_chars, "eot": eot.astype(np.float32).tolist(), "prompt_end": prompt_end}
finish_dataset(work, out, meta, norm_sample, seed)
print(f"{out}: {meta['train_docs']} train / {meta['val_docs']} val documents, "
      f"{meta['train_rows']} / {meta['val_rows']} concepts (d_emb {enc.d_emb}, {encoder}); "
      f"{meta['empty_docs_skipped']} empty documents skipped; {time.time() - t0:.1f}s, "
      f"{bar.n * world / (time.time() - t0):.0f} sentences/s")
end_distributed()
