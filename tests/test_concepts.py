"""
Text <-> concepts (concepts.py): sentence splitting, and retrieval decoding for encoders without a
decoder.
"""
import numpy as np
import pytest
import torch

import concepts
from conftest import write_dataset

def test_sentences_are_cut_on_word_boundaries_never_dropped():
    nlp = concepts.sentence_splitter()
    long = " ".join(f"word{i}" for i in range(80))
    docs = concepts.split_sentences(nlp, [f"Short  one.\n\nThen {long}.", "   ", "Final."],
                                    max_chars=50)
    assert docs[0][0] == "Short one."
    assert all(len(s) <= 50 for s in docs[0]) and " ".join(docs[0][1:]) == f"Then {long}."
    assert docs[1] == [] and docs[2] == ["Final."]

@pytest.mark.parametrize("text, sentences", [
    ("火灾正在向小镇蔓延。居民已经撤离。警方关闭了高速公路。", ["火灾正在向小镇蔓延。", "居民已经撤离。", "警方关闭了高速公路。"]),
    ("明日は雨でしょう！本当？「はい。」と言った。", ["明日は雨でしょう！", "本当？", "「はい。」と言った。"]),
    ("यह एक वाक्य है।यह दूसरा है।", ["यह एक वाक्य है।", "यह दूसरा है।"]),
    ("هل هذا سؤال؟نعم هذا سؤال.", ["هل هذا سؤال؟", "نعم هذا سؤال."]),
    ("ዛሬ ዝናብ ዘነበ።ነገ ፀሐይ ይወጣል።", ["ዛሬ ዝናብ ዘነበ።", "ነገ ፀሐይ ይወጣል።"]),
    ("Pi is 3.14. Really? Yes. Fine!", ["Pi is 3.14.", "Really?", "Yes.", "Fine!"]),
])
def test_sentences_are_split_in_scripts_without_spaces(text, sentences):
    assert concepts.split_sentences(concepts.sentence_splitter(), [text]) == [sentences]

def test_a_document_longer_than_spacys_limit_is_split_whole():
    text = "".join(f"Sentence number {i} is here. " for i in range(40_000))  # 1.2M characters
    assert len(text) > 1_000_000
    [sents] = concepts.split_sentences(concepts.sentence_splitter(), [text])
    assert sents == [f"Sentence number {i} is here." for i in range(40_000)]

def test_retrieval_returns_the_exact_sentence_of_a_bank_embedding(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(5, 16)).astype(np.float32) for _ in range(6)]
    meta = write_dataset(tmp_path, "bank", docs[:4], docs[4:], docs[0][-1])
    # multi-byte: lines are found by their bytes
    lines = [f"документ {i // 5}, 文 {i % 5}." for i in range(20)]
    (tmp_path / "bank" / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    bank = concepts.SentenceBank(str(tmp_path / "bank"), meta)
    # chunks smaller than the bank
    idx, cos = bank.nearest(np.stack([docs[2][3], docs[1][0]]), chunk=7)
    # the nearest of each query
    idx = idx[:, 0]
    assert list(idx) == [13, 5] and np.all(cos > 0.999)
    assert bank.texts([*idx, 0, 19]) == [lines[13], lines[5], lines[0], lines[19]]

def test_retrieval_never_repeats_a_sentence_nor_returns_end_of_text(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(5, 16)).astype(np.float32) for _ in range(6)]
    eot = rng.normal(size=16).astype(np.float32)
    for d in docs:
        d[-1] = eot
    meta = write_dataset(tmp_path, "bank", docs[:4], docs[4:], eot)
    bank = concepts.SentenceBank(str(tmp_path / "bank"), meta)
    # five times the same concept, one after the other as a text goes on, then end of text itself
    queries = torch.tensor(np.stack([docs[1][2]] * 5 + [eot]))
    texts = []
    rows = []
    for q in queries:
        said, _, row = bank.decode(q[None], [["doc 1 sentence 2"] + texts])
        texts += said
        rows += list(row)
    assert len(set(texts)) == 6 and "doc 1 sentence 2" not in texts
    assert all(not t.endswith("sentence 4") for t in texts)
    # each text comes with its own row
    lines = (tmp_path / "bank" / "train.txt").read_text().splitlines()
    train = np.concatenate(docs[:4]).astype(np.float16).astype(np.float32)
    assert all(np.array_equal(rows[i], train[lines.index(t)]) for i, t in enumerate(texts))
    # the sentences of other texts (other rows of one call) are not this text's to avoid
    texts, _, _ = bank.decode(queries[:5], [["doc 1 sentence 2"]] * 5)
    assert len(set(texts)) == 1 and texts[0] != "doc 1 sentence 2"
    texts, _, _ = bank.decode(queries[:5], [["doc 1 sentence 2"]] * 5, repeats=True)
    assert texts == ["doc 1 sentence 2"] * 5
