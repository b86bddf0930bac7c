"""
ACLSum as baselcm's input: the `aclsum` package (MIT) ships it in its wheel, 250 ACL papers (100
train, 50 validation, 100 test) with the sentences of each one's abstract, introduction and
conclusion, and a short summary of each of three aspects: the challenge, the approach, the outcome.
It writes
- corpora/aclsum_text.jsonl: the text of the training and validation papers, a document each, to
  pretrain on;
- corpora/aclsum_pairs.jsonl: (paper -> aspect summary) pairs, three a paper. The prompt is the
  paper's sentences, then one that names the aspect asked for ("The challenge:"): without it, a
  paper's three answers would share one prompt. The answer is the summary. A split column puts the
  test papers in val, the others in train: a paper's pairs are never on both sides.
- corpora/aclsum_abstracts.jsonl: (introduction and conclusion -> abstract) pairs, a paper each, the
  prompt closed by "The abstract:"; answers of 2 to 15 sentences (median 6), split as above.
$ pip install aclsum
$ python scripts/aclsum_data.py
$ python embed.py --dataset=corpora/aclsum_text.jsonl
$ python embed.py --dataset=corpora/aclsum_pairs.jsonl --pairs=prompt,answer --split_column=split
$ python embed.py --dataset=corpora/aclsum_abstracts.jsonl --pairs=prompt,answer --split_column=split
"""
import json, os, re, sys

try:
    import aclsum
except ImportError:
    sys.exit("error: the aclsum package is missing: pip install aclsum")

ASPECTS = {"challenge": "The challenge:", "approach": "The approach:", "outcome": "The outcome:"}
data = os.path.join(os.path.dirname(aclsum.__file__), "dataset")

def detokenize(sentence):
    # the papers' sentences come tokenized ("results , as in ( 1 ) ."): spaces around punctuation go
    sentence = re.sub(r" ([.,;:!?%)\]}]|'s|n't)", r"\1", sentence)
    return re.sub(r"([(\[{$]) ", r"\1", sentence)

papers = {}
for split in ("train", "val", "test"):
    with open(os.path.join(data, f"{split}.jsonl"), encoding="utf-8") as f:
        papers[split] = [json.loads(line) for line in f]
sentences = lambda p: [detokenize(s) for part in ("abstract", "introduction", "conclusion")
                       for s in p["sentences"][part]]

os.makedirs("corpora", exist_ok=True)
with open("corpora/aclsum_text.jsonl", "w") as f:
    for p in papers["train"] + papers["val"]:
        f.write(json.dumps({"text": sentences(p)}) + "\n")
with open("corpora/aclsum_pairs.jsonl", "w") as f:
    for split, group in (("train", papers["train"] + papers["val"]), ("val", papers["test"])):
        for p in group:
            for aspect, ask in ASPECTS.items():
                pair = {"prompt": sentences(p) + [ask], "answer": p["summary"][aspect],
                        "split": split, "paper": p["id"], "aspect": aspect}
                f.write(json.dumps(pair) + "\n")
with open("corpora/aclsum_abstracts.jsonl", "w") as f:
    for split, group in (("train", papers["train"] + papers["val"]), ("val", papers["test"])):
        for p in group:
            prompt = [detokenize(s) for part in ("introduction", "conclusion")
                      for s in p["sentences"][part]]
            abstract = [detokenize(s) for s in p["sentences"]["abstract"]]
            f.write(json.dumps({"prompt": prompt + ["The abstract:"], "answer": abstract, "split": split,
                                "paper": p["id"]}) + "\n")
n = {s: len(v) for s, v in papers.items()}
print(f"corpora/aclsum_text.jsonl: {n['train'] + n['val']} papers; corpora/aclsum_pairs.jsonl: "
      f"{3 * (n['train'] + n['val'])} train pairs, {3 * n['test']} val pairs (the test papers); "
      f"corpora/aclsum_abstracts.jsonl: {n['train'] + n['val']} and {n['test']}")
