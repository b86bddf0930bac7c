"""
embed.py as a user runs it, with a stand-in `sonar` that records its calls: the data format,
resuming after kill -9, two processes, the official parquet schema, pairs, bad input, settings that
must not mix.
"""
import json, os, signal, subprocess, sys, time

import numpy as np
import pytest
import torch

import concepts, datafiles
from conftest import ENV, HERE, TORCHRUN, corpus, read_dataset, run, write_dataset
from datafiles import fit_normalizer

def same_bytes(data, a, b, files):
    """Two dataset folders under data hold the same bytes in each of files."""
    for f in files:
        assert (data / a / f).read_bytes() == (data / b / f).read_bytes(), f

@pytest.mark.slow
def test_embed_with_sonar_writes_the_data_format(sonar_env, tmp_path):
    env, calls = sonar_env
    src = corpus(tmp_path / "docs.txt")
    with open(src, "a") as f:
        f.write("   \n")  # an empty document: skipped and counted
    run("embed.py", f"--dataset={src}", "--encoder=sonar", "--lang=deu_Latn", "--batch_size=7",
        "--chunk_docs=5", "--val_fraction=0.25", "--device=cpu", cwd=tmp_path, env=env)
    d = read_dataset(tmp_path / "data" / "docs")
    meta = d["meta"]
    assert meta["encoder"] == "sonar" and meta["d_emb"] == 1024 and meta["empty_docs_skipped"] == 1
    assert meta["train_docs"] + meta["val_docs"] == 12 and meta["val_docs"] > 0
    init = [c for c in calls() if c["call"] == "encoder_init"][0]
    assert init["encoder"] == "text_sonar_basic_encoder" and init["device"] == "cpu"
    enc = [c for c in calls() if c["call"] == "encode"]
    assert {c["source_lang"] for c in enc} == {"deu_Latn"} and {c["batch_size"] for c in enc} == {7}
    eot = np.array(meta["eot"], dtype=np.float16)
    for s in ("train", "val"):
        rows, offsets, texts = d[s]
        assert len(rows) == offsets[-1] == len(texts)
        assert all(texts[o - 1] == concepts.EOT_TEXT and np.array_equal(rows[o - 1],
                                                                        eot) for o in offsets[1:])
        stand_in = torch.stack([torch.randn(1024, generator=torch.Generator().manual_seed(
            __import__("zlib").crc32(t.encode()))) for t in texts]).numpy().astype(np.float16)
        assert np.array_equal(rows, stand_in)  # each row is its own sentence's embedding
    # whitespace normalized
    assert "Document 3 says thing 0 about topic 0." in d["train"][2] + d["val"][2]
    center, scale = fit_normalizer(d["train"][0].astype(np.float32))
    assert np.allclose(meta["normalizer"]["center"],
                       center) and np.allclose(meta["normalizer"]["scale"], scale)
    assert set(meta) >= set(write_dataset(tmp_path / "x", "y", [np.zeros((2, 3))],
                                          [np.zeros((2, 3))], np.zeros(3)))
    assert not list((tmp_path / "data" / "docs").glob("work*"))
    again = run("embed.py", f"--dataset={src}", "--encoder=sonar", "--lang=deu_Latn",
                "--chunk_docs=5", "--val_fraction=0.25", cwd=tmp_path, env=env)
    assert "already built" in again.stdout

@pytest.mark.slow
def test_embed_resumes_after_kill_9_with_identical_files(sonar_env, tmp_path):
    env, calls = sonar_env
    src = corpus(tmp_path / "docs.txt", n_docs=30)
    args = [f"--dataset={src}", "--encoder=sonar", "--chunk_docs=2", "--device=cpu"]
    run("embed.py", *args, "--name=whole", cwd=tmp_path, env=env)
    n_done = kill_after_chunks(args, env, tmp_path, 3)
    assert 3 <= n_done < 15
    n_before = len([c for c in calls() if c["call"] == "encode"])
    run("embed.py", *args, cwd=tmp_path, env=env)
    # eot + the rest
    assert len([c for c in calls() if c["call"] == "encode"]) - n_before == 1 + 15 - n_done
    same_bytes(tmp_path / "data", "whole", "docs", ("train.bin", "val.bin", "train.txt", "val.txt",
                                                    "train_offsets.npy", "val_offsets.npy", "meta.json"))

@pytest.mark.slow
def test_embed_on_two_processes_equals_one(sonar_env, tmp_path):
    env, _ = sonar_env
    src = corpus(tmp_path / "docs.txt", n_docs=20)
    args = [f"--dataset={src}", "--encoder=sonar", "--chunk_docs=3", "--device=cpu"]
    run("embed.py", *args, "--name=one", cwd=tmp_path, env=env)
    run(TORCHRUN + [os.path.join(HERE, "embed.py")], *args, "--name=two", cwd=tmp_path, env=env)
    same_bytes(tmp_path / "data", "one", "two",
               ("train.bin", "val.bin", "train.txt", "train_offsets.npy", "meta.json"))

@pytest.mark.slow
def test_official_lcm_parquet_is_imported_without_reencoding(sonar_env, tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    env, calls = sonar_env
    rng = np.random.default_rng(0)
    sents = [[f"Doc {i}, sentence {j}." for j in range(3 + i % 3)] for i in range(10)]
    embs = [rng.normal(size=(len(s), 1024)).astype(np.float32) for s in sents]
    pq.write_table(pa.table({"text_sentences": sents,
                             "text_sentences_sonar_emb": [list(e) for e in embs]}),
                   tmp_path / "lcm.parquet")
    run("embed.py", f"--dataset={tmp_path / 'lcm.parquet'}", "--val_fraction=0.3", "--device=cpu",
        cwd=tmp_path, env=env)
    # one call: end of text, a full batch of it (a warm-up)
    assert [c["n"] for c in calls() if c["call"] == "encode"] == [128]
    d = read_dataset(tmp_path / "data" / "lcm")
    rows = np.concatenate([d["train"][0], d["val"][0]])
    texts = d["train"][2] + d["val"][2]
    for s, e in zip(sents, embs):
        at = texts.index(s[0])
        assert texts[at:at + len(s) + 1] == s + [concepts.EOT_TEXT]
        assert np.array_equal(rows[at:at + len(s)], e.astype(np.float16))

@pytest.mark.slow
def test_a_pairs_dataset_round_trips_through_the_on_disk_format(sonar_env, tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    env, calls = sonar_env
    pairs, expect = [], []
    for i in range(12):
        prompt, answer = [f"Question {i} is here.", "It has two sentences."], [f"Answer {i}."] + [
            f"Answer {i} again."] * (i % 2)
        # text, split by spaCy; or lists of sentences already split; an empty answer is skipped
        pairs.append({"prompt": prompt if i == 5 else " ".join(prompt),
                      "answer": "" if i == 7 else " ".join(answer), "split": "val" if i % 4 == 0 else "train"})
        expect.append((prompt + ["[MODEL]:"], answer, pairs[-1]["split"]) if i != 7 else None)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run("embed.py", f"--dataset={tmp_path / 'qa.jsonl'}", "--pairs=prompt,answer", "--split_column=split",
        "--prompt_end=[MODEL]:", "--encoder=sonar", "--chunk_docs=5", cwd=tmp_path, env=env)
    d = read_dataset(tmp_path / "data" / "qa")
    assert d["meta"]["pairs"] and d["meta"]["prompt_end"] == "[MODEL]:"
    assert d["meta"]["empty_docs_skipped"] == 1
    for split in ("train", "val"):
        rows, offsets, texts = d[split]
        starts = datafiles.load_split(str(tmp_path / "data" / "qa"), split, d["meta"])[2]
        docs = [texts[lo:end] for lo, end in zip(offsets[:-1], offsets[1:])]
        mine = [e for e in expect if e and e[2] == split]
        assert len(docs) == len(mine) == len(starts) > 0
        for doc, lo, start, (prompt, answer, _) in zip(docs, offsets, starts, mine):
            assert doc == prompt + answer + [concepts.EOT_TEXT]
            assert start - lo == len(prompt) and texts[start] == answer[0]
    # the official schema's pairs: prompt and text sentences with embeddings, not encoded again
    rng = np.random.default_rng(0)
    prompts = [[f"Prompt {i}."] * 2 for i in range(6)]
    answers = [[f"Text {i}."] for i in range(6)]
    emb = lambda sents: [list(e) for e in rng.normal(size=(len(sents), 1024)).astype(np.float32)]
    table = {"prompt_sentences": prompts, "prompt_sentences_sonar_emb": [emb(p) for p in prompts],
             "text_sentences": answers, "text_sentences_sonar_emb": [emb(a) for a in answers]}
    pq.write_table(pa.table(table), tmp_path / "official.parquet")
    run("embed.py", f"--dataset={tmp_path / 'official.parquet'}", "--val_fraction=0.3", cwd=tmp_path, env=env)
    d = read_dataset(tmp_path / "data" / "official")
    assert d["meta"]["pairs"]
    rows = np.concatenate([d["train"][0], d["val"][0]])
    texts = d["train"][2] + d["val"][2]
    for i in range(6):
        at = texts.index(f"Prompt {i}.")
        assert texts[at:at + 4] == prompts[i] + answers[i] + [concepts.EOT_TEXT]
        given = np.array(table["prompt_sentences_sonar_emb"][i] + table["text_sentences_sonar_emb"][i])
        assert np.array_equal(rows[at:at + 3], given.astype(np.float16))

@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("column", "no column 'body'"),
    ("empty", "has no documents"),
    ("bytes", "not valid UTF-8"),
    ("parquet", "cannot read"),
    ("lang", "unknown language code 'english'"),
    ("nosonar",
     "cannot load 'cointegrated/SONAR_200_text_encoder' for the transformers port of SONAR"),
    ("broken sonar",
     "SONAR (sonar-space) is broken (OSError: /x/_torchaudio.abi3.so: undefined symbol"),
    ("hub", "cannot load dataset 'nobody-here/no-such-dataset'"),
    ("--val_fraction=1.0", "--val_fraction=1.0 must be between 0 and 1"),
    ("--batch_size=0", "--batch_size=0 must be at least 1"),
    ("--chunk_docs=0", "--chunk_docs=0 must be at least 1"),
    ("--max_chars=0", "--max_chars=0 must be at least 1"),
    ("--max_docs=-1", "--max_docs=-1 must be 0"),
    ("--device=cuda", "this machine has no cuda"),
    ("data_root", "cannot write to --data_root"),
])
def test_embed_bad_input_gives_one_line_and_leaves_no_dataset(case, message, sonar_env, tmp_path):
    env, _ = sonar_env
    src = corpus(tmp_path / "docs.txt")
    args = {"missing": [f"--dataset={tmp_path / 'nope.jsonl'}"],
            "column": [f"--dataset={src}", "--text_column=body"],
            "empty": [f"--dataset={tmp_path / 'empty.txt'}"],
            "bytes": [f"--dataset={tmp_path / 'bad.txt'}"],
            "parquet": [f"--dataset={tmp_path / 'bad.parquet'}"],
            "hub": ["--dataset=nobody-here/no-such-dataset"],  # offline: the hub is unreachable
            "data_root": [f"--dataset={src}", f"--data_root={tmp_path / 'afile' / 'data'}"],
            "lang": [f"--dataset={src}", "--lang=english"]}.get(case, [f"--dataset={src}", case])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "afile").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"Fine line.\n" * 5 + b"Bad \xff\xfe byte.\n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    if case == "nosonar":
        env = ENV
    if case == "broken sonar":  # imports, then fails as a torchaudio built for another torch does
        (tmp_path / "fake" / "sonar" / "inference_pipelines" / "text.py").write_text(
            "raise OSError('/x/_torchaudio.abi3.so: undefined symbol: _ZN3c10')")
    p = run("embed.py", "--encoder=sonar", "--device=cpu",
            *[a for a in args if a not in ("nosonar", "broken sonar")],
            cwd=tmp_path, env=env, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not list(tmp_path.glob("data/*/meta.json")) and ("network" in p.stderr) == (case == "hub")

@pytest.mark.slow
def test_the_bar_counts_sentences_and_documents_as_they_are_encoded_on_few_long_documents(sonar_env,
                                                                                        tmp_path):
    env, calls = sonar_env
    # three documents of 200 sentences: one chunk, which the bar must not wait for
    src = tmp_path / "long.txt"
    doc = lambda d: " ".join(f"Doc {d} says thing {i}." for i in range(200))
    src.write_text("".join(doc(d) + "\n" for d in range(3)))
    p = run("embed.py", f"--dataset={src}", "--encoder=sonar", "--batch_size=8",
            "--val_fraction=0.34", cwd=tmp_path, env=dict(env, FAKE_SONAR_DELAY="0.15"))
    updates = [u for u in p.stderr.replace("\r", "\n").splitlines() if "sent" in u and "docs=" in u]
    counts = [int(u.split("sent")[0].split()[-1]) for u in updates]
    # the encoder took 64 sentences at a time (8 batches), and the bar moved with each
    assert [c["n"] for c in calls() if c["call"] == "encode"][1:] == [64] * 9 + [24]
    within = {c for c in counts if 0 < c < 600}
    assert len(within) >= 3 and all(c % 64 == 0 for c in within) and max(counts) == 600, counts
    docs = [int(u.split("docs=")[1].split("]")[0]) for u in updates]
    assert docs == sorted(docs) and 1 in docs and docs[-1] == 3, updates
    assert "/s" in updates[-1]

def kill_after_chunks(args, env, cwd, n):
    """Starts embed.py with a slow encoder and kills it (-9) once n chunks are on disk."""
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "embed.py"), *args], cwd=cwd,
                         env=dict(env, FAKE_SONAR_DELAY="0.3"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    work, deadline = cwd / "data" / "docs", time.time() + 120
    while time.time() < deadline and len(list(work.glob("work-*/chunk*.npz"))) < n:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (cwd / "data" / "docs" / "meta.json").exists()
    return len(list(work.glob("work-*/chunk*.npz")))

@pytest.mark.slow
def test_partial_work_from_other_settings_is_never_reused(sonar_env, tmp_path):
    env, _ = sonar_env
    src = corpus(tmp_path / "docs.txt", n_docs=30)
    args = [f"--dataset={src}", "--encoder=sonar", "--device=cpu"]
    assert kill_after_chunks([*args, "--chunk_docs=2"], env, tmp_path, 3) < 15
    p = run("embed.py", *args, "--dtype=float32", cwd=tmp_path, env=env)  # other chunking and dtype
    assert "partial work from other settings: starting clean" in p.stdout
    run("embed.py", *args, "--dtype=float32", "--name=clean", cwd=tmp_path, env=env)
    same_bytes(tmp_path / "data", "docs", "clean",
               ("train.bin", "val.bin", "train.txt", "val.txt", "train_offsets.npy"))

@pytest.mark.slow
def test_a_failed_run_does_not_block_the_fixed_rerun(sonar_env, tmp_path):
    env, _ = sonar_env
    src = tmp_path / "docs.txt"
    src.write_text("Only one document. It has two sentences.\n")
    p = run("embed.py", f"--dataset={src}", "--encoder=sonar", "--device=cpu", cwd=tmp_path,
            env=env, check=False)
    assert p.returncode == 1 and "empty" in p.stderr
    corpus(src, n_docs=30)  # the fix: more documents in the same file
    run("embed.py", f"--dataset={src}", "--encoder=sonar", "--device=cpu", cwd=tmp_path, env=env)
    meta = json.load(open(tmp_path / "data" / "docs" / "meta.json"))
    assert meta["train_docs"] + meta["val_docs"] == 30

@pytest.mark.slow
def test_another_source_or_other_settings_under_the_same_name_are_refused(sonar_env, tmp_path):
    env, _ = sonar_env
    txt, jsonl = corpus(tmp_path / "docs.txt", n_docs=30), tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in txt.read_text().splitlines()[::-1]))
    run("embed.py", f"--dataset={txt}", "--encoder=sonar", cwd=tmp_path, env=env)
    for args, message in (([f"--dataset={jsonl}"],
                           f"data/docs was built from {txt}: pass --name=NEW"),
                          ([f"--dataset={txt}", "--max_chars=100"],
                           "was built with other settings (max_chars)")):
        p = run("embed.py", *args, "--encoder=sonar", cwd=tmp_path, env=env, check=False)
        assert p.returncode == 1 and message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    run("embed.py", f"--dataset={jsonl}", "--encoder=sonar", "--overwrite=True",
        cwd=tmp_path, env=env)
    meta = json.load(open(tmp_path / "data" / "docs" / "meta.json"))
    assert meta["settings"]["dataset"] == str(jsonl)
    json.dump({k: v for k, v in meta.items() if k != "settings"},
              open(tmp_path / "data" / "docs" / "meta.json", "w"))
    # made before
    p = run("embed.py", f"--dataset={jsonl}", "--encoder=sonar", cwd=tmp_path, env=env, check=False)
    assert p.returncode == 1 and "was built by an older baselcm, which did not record its settings" in p.stderr

@pytest.mark.slow
def test_a_folder_of_txt_files_is_one_document_per_file(sonar_env, tmp_path):
    env, _ = sonar_env
    names = ["training-notes.txt", "doc001.txt", "doc002.txt", "sub/validation.txt",
             "test.txt", "zz.txt"]
    for i, name in enumerate(names):
        (tmp_path / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / name).write_text(f"File {i} line one.\nFile {i} line two.\n\nFile {i} line three.\n")
    run("embed.py", f"--dataset={tmp_path / 'docs'}", "--encoder=sonar", "--val_fraction=0.3",
        cwd=tmp_path, env=env)
    d = read_dataset(tmp_path / "data" / "docs")
    lengths = np.concatenate([np.diff(d["train"][1]), np.diff(d["val"][1])])
    # three sentences and end of text, from each file
    assert len(lengths) == 6 and (lengths == 4).all()
    files = {t.split()[1] for t in d["train"][2] + d["val"][2] if t.startswith("File")}
    assert files == {str(i) for i in range(6)}
