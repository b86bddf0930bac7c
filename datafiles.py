"""
The on-disk dataset format that embed.py writes and train.py and sample.py read, and the batches
drawn from it. data_root/name/ holds:
  train.bin, val.bin                   concepts, raw float16 or float32, (n_rows, d_emb): a memmap
  train_offsets.npy, val_offsets.npy   int64 (n_docs + 1,): document i is rows offsets[i]:offsets[i+1]
  train_answers.npy, val_answers.npy   int64 (n_docs,): the row where each pair's answer starts
  train.txt, val.txt                   the sentence of each row, one a line
  meta.json                            encoder, d_emb, normalizer, mean, eot, settings, ... (written last)
Every document ends with the row of "End of text.".
"""
import glob, itertools, json, os, shutil, zlib

import numpy as np
import torch
from tqdm import tqdm

from common import die

def load_split(data_dir, split, meta):
    """-> (rows: a memmap (n, d_emb), offsets (n_docs + 1,), answers (n_docs,) or None)"""
    rows = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    offsets = np.load(os.path.join(data_dir, f"{split}_offsets.npy"))
    answers = np.load(os.path.join(data_dir, f"{split}_answers.npy")) if meta.get("pairs") else None
    return rows.reshape(-1, meta["d_emb"]), offsets, answers

def fit_normalizer(x):
    """x: (n, d_emb) training concepts -> the normalizer's (center, scale), float32 numpy arrays."""
    # true quartiles: the official code passes (0.25, 0.75) to a percentile API that wants (25, 75)
    q25, median, q75 = np.percentile(np.asarray(x, dtype=np.float64), [25, 50, 75], axis=0)
    scale = np.maximum((q75 - q25) / 1.349, 1e-6)  # 1.349: the IQR of a unit normal
    return median.astype(np.float32), scale.astype(np.float32)

def chunks_to_do(docs, chunk_docs, work, rank, world, skipped):
    """-> (k, rows) of each chunk of docs this rank encodes that is not on disk yet"""
    for k in itertools.count():
        rows = list(itertools.islice(docs, chunk_docs))
        if not rows:
            return
        if k % world == rank and not os.path.exists(os.path.join(work, f"chunk{k:06d}.npz")):
            yield k, rows
        else:
            skipped(len(rows))

def write_chunk(work, rank, k, emb, sents, answers, held_out, n_empty):
    """Chunk k of a dataset, written atomically: on disk whole or not at all"""
    tmp = os.path.join(work, f"tmp{rank}.npz")
    np.savez(tmp, emb=emb, lengths=np.array([len(s) for s in sents], dtype=np.int64),
             text=np.array("\n".join("\n".join(s) for s in sents)), n_empty=n_empty,
             answers=np.array(answers, dtype=np.int64),
             held_out=np.array([-1 if h is None else h for h in held_out], dtype=np.int8))
    os.replace(tmp, os.path.join(work, f"chunk{k:06d}.npz"))

def write_splits(work, seed, val_fraction):
    """The chunks, in order -> train and val files; a document's split by its index"""
    chunks = sorted(glob.glob(os.path.join(work, "chunk*.npz")))
    files = {s: {"bin": open(os.path.join(work, f"{s}.bin"), "wb"),
                 "txt": open(os.path.join(work, f"{s}.txt"), "w"),
                 "offsets": [0], "answers": []} for s in ("train", "val")}
    n_docs = 0
    n_empty = 0
    for path in tqdm(chunks, desc="assemble", unit="chunk", disable=len(chunks) < 10):
        with np.load(path) as z:
            emb = z["emb"]
            lengths = z["lengths"]
            text = str(z["text"]).split("\n")
            n_empty += int(z["n_empty"])
            answers = z["answers"]
            held_out = z["held_out"]
        at = 0
        for length, answer, h in zip(lengths, answers, held_out):
            if h < 0:
                h = zlib.crc32(f"{seed}:{n_docs}".encode()) % 10_000 < val_fraction * 10_000
            f = files["val" if h else "train"]
            emb[at:at + length].tofile(f["bin"])
            f["txt"].write("\n".join(text[at:at + length]) + "\n")
            f["answers"].append(f["offsets"][-1] + int(answer))
            f["offsets"].append(f["offsets"][-1] + int(length))
            at += length
            n_docs += 1
    for s, f in files.items():
        f["bin"].close()
        f["txt"].close()
        np.save(os.path.join(work, f"{s}_offsets.npy"), np.array(f["offsets"], dtype=np.int64))
        np.save(os.path.join(work, f"{s}_answers.npy"), np.array(f["answers"], dtype=np.int64))
    counts = {f"{s}_docs": len(f["offsets"]) - 1 for s, f in files.items()}
    counts |= {f"{s}_rows": f["offsets"][-1] for s, f in files.items()}
    for s in ("train", "val"):
        if counts[f"{s}_rows"] == 0:
            die(f"{n_docs} documents with text give an empty {s} split: use more documents or another "
                "--val_fraction (or --split_column)")
    pairs = any(a > o for s, f in files.items() for a, o in zip(f["answers"], f["offsets"]))
    return counts | {"empty_docs_skipped": n_empty, "pairs": pairs}

def finish_dataset(work, out, meta, norm_sample, seed):
    """Fits the normalizer, moves the splits to out, then writes meta.json, last"""
    rows, _, _ = load_split(work, "train", meta)
    pick = np.random.default_rng(seed).choice(len(rows), min(len(rows), norm_sample), replace=False)
    sample = np.asarray(rows[np.sort(pick)], dtype=np.float32)
    center, scale = fit_normalizer(sample)
    meta["normalizer"] = {"center": center.tolist(), "scale": scale.tolist()}
    # the training mean: a baseline of the evaluations
    meta["mean"] = sample.mean(0).tolist()
    for s in ("train", "val"):
        for f in (f"{s}.bin", f"{s}.txt", f"{s}_offsets.npy", f"{s}_answers.npy"):
            os.replace(os.path.join(work, f), os.path.join(out, f))
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
    shutil.rmtree(work)

def sample_windows(rng, offsets, n, block_size, answers=None):
    """n random windows inside documents -> (starts, documents' ends, first row predicted)"""
    if answers is not None:
        doc = rng.integers(0, len(offsets) - 1, n)
        end = offsets[doc + 1]
        start = np.maximum(offsets[doc], end - block_size - 1)
        return start, end, np.maximum(start + 1, answers[doc])
    r = rng.integers(0, offsets[-1], n)
    doc = np.searchsorted(offsets, r, side="right") - 1
    lo = offsets[doc]
    end = offsets[doc + 1]
    hi = np.maximum(lo, end - block_size - 1)
    start = lo + (rng.random(n) * (hi - lo + 1)).astype(np.int64)
    return start, end, start + 1

def stop_prior(offsets, answers, n):
    """The texts' lengths -> (log-odds of end of text; of ending after i sentences, less it)"""
    lengths = offsets[1:] - 1 - (offsets[:-1] if answers is None else answers)
    logit = lambda p: np.log(p / (1 - p))
    rate = logit(len(lengths) / (lengths + 1).sum())
    ends = np.array([((lengths == i).sum() + 0.5) / ((lengths >= i).sum() + 1) for i in range(n)])
    return rate, logit(ends) - rate

def count_targets(starts, ends, first, block_size):
    return int((np.minimum(ends, starts + block_size + 1) - first).clip(0).sum())

def get_batch(rows, starts, ends, first, block_size, device="cpu"):
    """-> x, y (B, T, d_emb) inputs and next concepts; mask, eot (B, T) real targets, ends"""
    n = np.minimum(ends - starts, block_size + 1)
    buf = np.zeros((len(starts), block_size + 1, rows.shape[1]), dtype=np.float32)
    for i, (s, k) in enumerate(zip(starts, n)):
        buf[i, :k] = rows[s:s + k]
    buf = torch.from_numpy(buf)
    target_rows = torch.from_numpy(starts)[:, None] + 1 + torch.arange(block_size)  # (B, T)
    ends = torch.from_numpy(ends)[:, None]
    mask = (target_rows < ends) & (target_rows >= torch.from_numpy(first)[:, None])
    flags = torch.stack([mask, mask & (target_rows == ends - 1)])
    # an asynchronous copy from pinned memory on CUDA only: on MPS a non-blocking copy from
    # ordinary memory can arrive corrupted (pytorch issues 139550, 189690)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        buf = buf.pin_memory()
        flags = flags.pin_memory()
    buf = buf.to(device, non_blocking=cuda)
    flags = flags.to(device, non_blocking=cuda)
    return buf[:, :-1], buf[:, 1:], flags[0], flags[1]

def eval_batches(rows, offsets, block_size, batch_size, n_windows, device, answers=None):
    """Fixed windows, every target once: get_batch's, and doc (B,), row (B, T) of each"""
    starts = []
    for lo, end in zip(offsets[:-1], offsets[1:]):
        starts += [max(lo, end - block_size - 1)] if answers is not None else range(lo, end - 1, block_size)
        if len(starts) >= n_windows:
            break
    starts = np.array(starts[:n_windows], dtype=np.int64)
    docs = np.searchsorted(offsets, starts, side="right") - 1
    first = starts + 1 if answers is None else np.maximum(starts + 1, answers[docs])
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        b = slice(i, i + batch_size)
        x, y, mask, eot = get_batch(rows, s, offsets[docs[b] + 1], first[b], block_size, device)
        doc = torch.as_tensor(docs[b], device=device)
        row = torch.as_tensor(s[:, None] + np.arange(1, block_size + 1), device=device)
        yield x, y, mask, eot, doc, row
