"""
Turns a text dataset into concept embeddings in the format train.py reads (see README, "Data format").
Documents -> sentences (spaCy) -> one embedding each (SONAR, MiniLM or any sentence-transformers model),
streamed through in chunks, so memory stays flat and a killed run continues where it stopped.

$ python embed.py                                  # offline default: gensim's Lee news corpus, MiniLM
$ python embed.py --dataset=wikitext --hf_config=wikitext-103-raw-v1 --encoder=sonar --device=cuda
$ torchrun --nproc_per_node=8 embed.py --dataset=my_docs.jsonl --encoder=sonar   # one share per GPU
"""
import glob, hashlib, itertools, json, os, shutil, sys, time, zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from itertools import chain, islice

import numpy as np
import torch
from tqdm import tqdm

from baselcm import (EOT_TEXT, check_lang, configure, die, fit_normalizer, get_device, load_encoder, load_meta,
                     same_space, sentence_splitter, split_sentences, writable_dir)

dataset = "lee"          # 'lee' (offline default), a .txt (a document per line) .jsonl .json .csv .parquet file,
                         # a folder of them (a .txt file there is one document), or a hub name
hf_config = ""           # hub dataset config name, e.g. wikitext-103-raw-v1
hf_split = "train"       # hub dataset split
text_column = ""         # '' = 'text'; official LCM parquet (text_sentences, text_sentences_sonar_emb) is auto-detected
max_docs = 0             # 0 = all documents
name = ""                # output goes to data_root/name; '' = derived from dataset
data_root = "data"
encoder = "minilm"       # 'minilm' (offline), 'sonar' (sonar-space, else its transformers port), 'sonar_hf' (the
                         # port), or a sentence-transformers model name
sonar_hf_encoder = "cointegrated/SONAR_200_text_encoder"  # the port's encoder and NLLB tokenizer (hub name or folder)
lang = "eng_Latn"        # FLORES-200 code of the text (SONAR uses it)
spacy_model = ""         # '' = rule-based sentencizer; or an installed pipeline such as en_core_web_sm
max_chars = 256          # longer sentences are cut on word boundaries
val_fraction = 0.1       # share of documents held out for validation
seed = 1337              # the train/val split
dtype = "float16"        # storage of the embeddings: float16 or float32
chunk_docs = 256         # documents per chunk: the unit of streaming, resuming and sharing among ranks
batch_size = 128         # sentences per encoder call
device = ""              # '' = autodetect
norm_sample = 1_000_000  # at most this many train rows fit the normalizer
overwrite = False
configure(globals(), sys.argv[1:])

# -----------------------------------------------------------------------------
# everything that can be checked before encoding is checked now
check_lang(lang)
if dtype not in ("float16", "float32"):
    die(f"--dtype={dtype} is not a storage type: use float16 or float32")
if not 0 < val_fraction < 1:
    die(f"--val_fraction={val_fraction} must be between 0 and 1")
for k in ("batch_size", "chunk_docs", "max_chars", "norm_sample"):
    if globals()[k] < 1:
        die(f"--{k}={globals()[k]} must be at least 1")
if max_docs < 0:
    die(f"--max_docs={max_docs} must be 0 (all documents) or more")
if dataset == "lee":  # ships inside gensim's wheel: 300 news documents, one per line
    from gensim.test.utils import datapath
    source, name = datapath("lee_background.cor"), name or "lee"
else:
    source = dataset
builders = {".txt": "text", ".cor": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ext = lambda f: os.path.splitext(f)[1].lower()
if os.path.isdir(source):  # all files of a folder; a .txt file is one document, other formats hold rows
    source_files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if ext(f) in builders)
    if len({builders[ext(f)] for f in source_files}) > 1:
        die(f"{source} mixes {' and '.join(sorted({ext(f) for f in source_files}))} files: use a folder of one kind")
    if not source_files:
        die(f"{source} holds no {', '.join(builders)} files")
elif os.path.isfile(source):
    if ext(source) not in builders:
        die(f"cannot read {source}: use a {', '.join(builders)} file, or a folder of them")
    source_files = [source]
elif ext(source) in builders or source.startswith((".", "/")):
    die(f"no such file or folder: {source}")
else:
    source_files = []  # a hub dataset
name = name or os.path.splitext(os.path.basename(os.path.normpath(dataset)))[0].replace("/", "_")
out = os.path.join(data_root, name)
work = os.path.join(out, "work")  # finished chunks live here until the final files are assembled
# what decides the output: a dataset folder and its partial work are tied to these, and reused only for them
top = source if os.path.isdir(source) else os.path.dirname(source)
settings = {k: globals()[k] for k in ("hf_config", "hf_split", "text_column", "max_docs", "encoder", "sonar_hf_encoder",
                                      "lang", "spacy_model", "max_chars", "chunk_docs", "dtype", "seed", "val_fraction",
                                      "norm_sample")} | {"dataset": os.path.abspath(source) if source_files else source,
            "files": [[os.path.relpath(f, top), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in source_files]}
key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
ddp = int(os.environ.get("RANK", -1)) != -1
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
device = get_device(device)
writable_dir(data_root, "data_root")
if ddp:  # gloo only waits for the ranks to finish; each rank encodes on its own GPU
    torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
if os.path.exists(os.path.join(out, "meta.json")) and not overwrite:
    old = load_meta(out).get("settings")
    if old == settings:
        print(f"{out} is already built with these settings; pass --overwrite=True to rebuild it")
        sys.exit(0)
    if old is None:
        what = "by an older baselcm, which did not record its settings"
    elif old["dataset"] != settings["dataset"]:
        what = f"from {old['dataset']}"
    else:
        what = f"with other settings ({', '.join(k for k in settings if old.get(k) != settings[k])})"
    die(f"{out} was built {what}: pass --name=NEW for a new dataset, or --overwrite=True to replace it")
marker = os.path.join(work, f"settings-{key}.json")
if rank == 0 and os.path.isdir(work) and (overwrite or not os.path.exists(marker)):
    if not overwrite:
        print(f"{work} holds partial work from other settings: starting clean")
    shutil.rmtree(work)
if rank == 0 and overwrite and os.path.exists(os.path.join(out, "meta.json")):
    os.remove(os.path.join(out, "meta.json"))  # unfinished from here on; the new files replace the old
if ddp:
    torch.distributed.barrier()

# -----------------------------------------------------------------------------
# documents, through Hugging Face datasets (streaming: nothing is loaded whole)
import datasets
datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as our one line

def not_utf8(e):
    die(f"{dataset} is not valid UTF-8 ({e.reason} at byte {e.start}): re-save it as UTF-8")

try:
    if source_files:
        kind = builders[ext(source_files[0])]
        by_file = {"sample_by": "document"} if kind == "text" and os.path.isdir(source) else {}
        docs = datasets.load_dataset(kind, data_files=source_files, split="train", streaming=True, **by_file)
    else:
        docs = datasets.load_dataset(source, hf_config or None, split=hf_split, streaming=True)
    docs = iter(docs)
    first = next(docs, None)
except UnicodeDecodeError as e:
    not_utf8(e)
except Exception as e:  # datasets raises many kinds for a bad name, a broken file or no network
    die(f"cannot {'read' if source_files else 'load dataset'} '{dataset}': {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}" + ("" if source_files else " (check the name, config, network)"))
if first is None:
    die(f"dataset '{dataset}' has no documents")
official = "text_sentences" in first and "text_sentences_sonar_emb" in first
if official and not same_space(encoder, "sonar"):
    print("official LCM parquet: its embeddings are SONAR's, so the encoder is sonar")
    encoder = "sonar"
text_column = text_column or "text"
if not official and text_column not in first:
    die(f"no column '{text_column}' in {dataset} (columns: {', '.join(first)}): pass --text_column=NAME")
docs = chain([first], docs)
if max_docs:
    docs = islice(docs, max_docs)

enc = load_encoder(encoder, device, (sonar_hf_encoder, ""))
eot = enc.encode([EOT_TEXT] * batch_size, lang=lang, batch_size=batch_size)[0]  # a full batch warms the encoder
nlp = sentence_splitter(spacy_model)

def sentences(rows):
    """dataset rows -> the sentences of each document (in a thread, beside the encoder)"""
    if official:
        return [[" ".join(s.split()) for s in r["text_sentences"]] for r in rows]
    return split_sentences(nlp, [r[text_column] if isinstance(r[text_column], str) else "" for r in rows], max_chars)

def embed_chunk(rows, sents):
    """rows and their sentences -> (sentences per document, embeddings (n, d)); EOT ends each document"""
    if official:
        emb = [np.asarray(r["text_sentences_sonar_emb"], dtype=np.float32).reshape(-1, enc.d_emb) for r in rows]
        emb = np.concatenate(emb) if emb else np.zeros((0, enc.d_emb), np.float32)
    else:
        flat = [s for doc in sents for s in doc]
        emb = enc.encode(flat, lang=lang, batch_size=batch_size) if flat else np.zeros((0, enc.d_emb), np.float32)
    keep = [i for i, s in enumerate(sents) if s]  # empty documents are skipped (and counted)
    parts, at = [], 0
    for i, s in enumerate(sents):
        if s:
            parts += [emb[at:at + len(s)], eot[None]]
        at += len(s)
    emb = np.concatenate(parts) if parts else np.zeros((0, enc.d_emb), np.float32)
    return [sents[i] + [EOT_TEXT] for i in keep], emb.astype(dtype), len(sents) - len(keep)

# -----------------------------------------------------------------------------
# encode: chunk k belongs to rank k % world; a chunk already on disk is not encoded again
os.makedirs(work, exist_ok=True)
if rank == 0:
    with open(marker, "w") as f:
        json.dump(settings, f)
t0, n_sent = time.time(), 0
bar = tqdm(total=max_docs or None, unit="doc", disable=rank != 0, desc=f"embed {name}")
def todo():
    """this rank's chunks that are not on disk yet, with their rows; the others count as done"""
    for k in itertools.count():
        rows = list(islice(docs, chunk_docs))
        if not rows:
            return
        path = os.path.join(work, f"chunk{k:06d}.npz")
        if k % world == rank and not os.path.exists(path):
            yield path, rows
        else:
            bar.update(len(rows))

try:
    with ThreadPoolExecutor(1) as pool:  # chunk k + 1 is split into sentences while chunk k encodes
        jobs = ((path, rows, pool.submit(sentences, rows)) for path, rows in todo())
        job = next(jobs, None)
        while job:
            path, rows, split = job
            job = next(jobs, None)
            sents, emb, n_empty = embed_chunk(rows, split.result())
            n_sent += len(emb) - len(sents)  # sentences encoded, without the end-of-text rows
            tmp = os.path.join(work, f"tmp{rank}.npz")  # not chunk*.npz: a killed write is never assembled
            np.savez(tmp, emb=emb, lengths=np.array([len(s) for s in sents], dtype=np.int64),
                     text=np.array("\n".join("\n".join(s) for s in sents)), n_empty=n_empty)
            os.replace(tmp, path)  # atomic: a chunk is on disk whole or not at all
            bar.update(len(rows))
            bar.set_postfix(sent_per_s=f"{n_sent * world / (time.time() - t0):.0f}")
except UnicodeDecodeError as e:  # streaming reads the file as it goes
    not_utf8(e)
bar.close()
if ddp:
    torch.distributed.barrier()
    if rank != 0:
        torch.distributed.destroy_process_group()
        sys.exit(0)

# -----------------------------------------------------------------------------
# assemble: stream the chunks, in order, into the train and val files (rank 0)
chunks = sorted(glob.glob(os.path.join(work, "chunk*.npz")))
files = {s: {"bin": open(os.path.join(work, f"{s}.bin"), "wb"), "txt": open(os.path.join(work, f"{s}.txt"), "w"),
             "offsets": [0]} for s in ("train", "val")}
n_docs, n_empty = 0, 0
for path in tqdm(chunks, desc="assemble", unit="chunk", disable=len(chunks) < 10):
    with np.load(path) as z:
        emb, lengths, text, n_empty = z["emb"], z["lengths"], str(z["text"]).split("\n"), n_empty + int(z["n_empty"])
    at = 0
    for length in lengths:
        # a document's split depends on its index and the seed only, not on chunking or ranks
        s = "val" if zlib.crc32(f"{seed}:{n_docs}".encode()) % 10_000 < val_fraction * 10_000 else "train"
        emb[at:at + length].tofile(files[s]["bin"])
        files[s]["txt"].write("\n".join(text[at:at + length]) + "\n")
        files[s]["offsets"].append(files[s]["offsets"][-1] + int(length))
        at, n_docs = at + length, n_docs + 1
for s, f in files.items():
    f["bin"].close(), f["txt"].close()
    np.save(os.path.join(work, f"{s}_offsets.npy"), np.array(f["offsets"], dtype=np.int64))
n_train, n_val = files["train"]["offsets"][-1], files["val"]["offsets"][-1]
if n_train == 0 or n_val == 0:
    die(f"{n_docs} documents with text give an empty {'train' if n_train == 0 else 'val'} split: "
        "use more documents or another --val_fraction")

train_rows = np.memmap(os.path.join(work, "train.bin"), dtype=dtype, mode="r").reshape(-1, enc.d_emb)
pick = np.sort(np.random.default_rng(seed).choice(n_train, min(n_train, norm_sample), replace=False))
sample = np.asarray(train_rows[pick], dtype=np.float32)
center, scale = fit_normalizer(sample)
for f in ("train.bin", "train.txt", "train_offsets.npy", "val.bin", "val.txt", "val_offsets.npy"):
    os.replace(os.path.join(work, f), os.path.join(out, f))
meta = {"encoder": encoder, "impl": enc.impl, "d_emb": enc.d_emb, "lang": lang,
        "dtype": dtype, "dataset": dataset, "key": key,
        "settings": settings,
        "spacy_model": spacy_model, "max_chars": max_chars,
        "train_docs": len(files["train"]["offsets"]) - 1, "val_docs": len(files["val"]["offsets"]) - 1,
        "train_rows": n_train, "val_rows": n_val, "empty_docs_skipped": n_empty,
        "normalizer": {"center": center.tolist(), "scale": scale.tolist()},
        "mean": sample.mean(0).tolist(), "eot": eot.astype(np.float32).tolist()}
with open(os.path.join(out, "meta.json.tmp"), "w") as f:
    json.dump(meta, f)
os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))  # last: marks the set finished
shutil.rmtree(work)
print(f"{out}: {meta['train_docs']} train / {meta['val_docs']} val documents, {n_train} / {n_val} concepts "
      f"(d_emb {enc.d_emb}, {encoder}); {n_empty} empty documents skipped; {time.time() - t0:.1f}s, "
      f"{n_sent * world / (time.time() - t0):.0f} sentences/s")
if ddp:
    torch.distributed.destroy_process_group()
