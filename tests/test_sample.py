"""
sample.py and the whole path as a user runs it: MiniLM end to end (embed, train, sample,
evaluate), SONAR decoding through a stand-in and through a tiny transformers port, one-line
errors.
"""
import json, os

import numpy as np
import pytest
import torch

import concepts
from baselcm import BaseLCM
from conftest import SONAR_DATA, TRAIN, read_dataset, run, save_checkpoint, tiny_config

@pytest.mark.slow
def test_minilm_end_to_end_embed_train_sample(tmp_path, tiny_lm):
    src = tmp_path / "news.jsonl"
    from gensim.test.utils import datapath
    docs = open(datapath("lee_background.cor")).read().splitlines()[:24]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run("embed.py", f"--dataset={src}", "--val_fraction=0.2", cwd=tmp_path)
    meta = json.load(open(tmp_path / "data" / "news" / "meta.json"))
    assert meta["encoder"] == "minilm" and meta["d_emb"] == 384
    # data/news
    run("train.py", "--dataset=news", "--max_iters=4", "--eval_interval=4", *TRAIN[:-1],
        cwd=tmp_path)
    p = run("sample.py", "--start=Firefighters battled the blaze overnight. The wind changed.",
            "--json=True",
            "--max_new_concepts=3", cwd=tmp_path)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["prompt"] == ["Firefighters battled the blaze overnight.", "The wind changed."]
    bank = set((tmp_path / "data" / "news" / "train.txt").read_text().splitlines())
    assert 1 <= len(result["steps"]) <= 3 and all(s["text"] in bank for s in result["steps"]), result
    assert all(-1 <= s["retrieved_cos"] <= 1 for s in result["steps"])
    said = [s["text"] for s in result["steps"]]
    assert len(set(said)) == len(said) and not set(said) & set(result["prompt"])
    text = run("sample.py", "--start=The wind changed.", "--max_new_concepts=2",
               cwd=tmp_path).stdout
    assert "[retrieved, cos " in text
    # guided from the training mean, the Base-LCM predicts another concept
    p = run("sample.py", "--start=Firefighters battled the blaze overnight. The wind changed.",
            "--json=True", "--max_new_concepts=1", "--guidance=3", cwd=tmp_path)
    guided = json.loads(p.stdout.strip().splitlines()[-1])["steps"][0]
    assert guided["retrieved_cos"] != result["steps"][0]["retrieved_cos"]
    # the diffusion model: a checkpoint says which model it holds, and sample.py follows it
    run("train.py", "--dataset=news", "--max_iters=4", "--eval_interval=4", "--model_type=one_tower",
        "--out_dir=out-diffusion", *TRAIN[:-1], cwd=tmp_path)
    p = run("sample.py", "--out_dir=out-diffusion", "--start=The wind changed.", "--json=True",
            "--max_new_concepts=3", "--num_samples=2", "--stop_eot=2", "--stop_end=0",
            "--stop_repeat=0", "--ddim_steps=4", cwd=tmp_path)
    samples = [json.loads(line) for line in p.stdout.strip().splitlines()[-2:]]
    said = [[s["text"] for s in sample["steps"]] for sample in samples]
    assert [len(s) for s in said] == [3, 3] and all(t in bank for s in said for t in s)
    # each sample starts from its own noise
    assert said[0] != said[1]
    # the Two-Tower, the same way
    run("train.py", "--dataset=news", "--max_iters=4", "--eval_interval=4", "--model_type=two_tower",
        "--out_dir=out-two", *TRAIN[:-1], cwd=tmp_path)
    p = run("sample.py", "--out_dir=out-two", "--start=The wind changed.", "--json=True",
            "--max_new_concepts=2", "--stop_eot=2", "--stop_end=0", "--ddim_steps=4", cwd=tmp_path)
    assert len(json.loads(p.stdout.strip().splitlines()[-1])["steps"]) == 2
    for part in tiny_lm:
        part.save_pretrained(tmp_path / "lm")
    p = run("train.py", "--eval_only=True", f"--mi_model={tmp_path / 'lm'}", cwd=tmp_path)
    assert "decoded text: retrieval of the nearest training sentence" in p.stdout
    results = json.load(open(tmp_path / "out" / "eval.json"))
    gen = results["continuations"]
    assert gen["random"]["samples"] > 0 and gen["decoded"]["distinct"] == 1.0
    assert all(np.isfinite(results[k]["mi"]) and results[k]["mi"] != 0 for k in ("model", "copy",
                                                                                 "mean")), results

@pytest.mark.slow
def test_sample_decodes_with_sonar_in_the_requested_language(sonar_env, tmp_path):
    env, calls = sonar_env
    torch.manual_seed(0)
    model = BaseLCM(tiny_config(d_emb=1024))
    # ends are rare, as training sets the stop head's bias from the data (datafiles.fit)
    model.stop.bias.data.fill_(-3.0)
    eot = torch.randn(1024)
    data = SONAR_DATA | {"eot": eot.tolist(), "dir": str(tmp_path / "nowhere")}
    save_checkpoint(tmp_path / "out", model, data)
    p = run("sample.py", "--start=One sentence. Two sentences.", "--lang=fra_Latn",
            "--max_new_concepts=4",
            "--device=cpu", cwd=tmp_path, env=env)
    assert p.stdout.splitlines()[:3] == ["One sentence.", "Two sentences.", "<fra_Latn> sentence 0"]
    enc = [c for c in calls() if c["call"] == "encode"]
    dec = [c for c in calls() if c["call"] == "decode"]
    # the language check, the prompt, then each decoded sentence encoded back into the context: the
    # stand-in decodes every concept to the same sentence, so the second is a repeat and stops
    assert [(c["source_lang"], c["n"]) for c in enc] == [("fra_Latn", 1), ("eng_Latn", 2),
                                                         ("fra_Latn", 1), ("fra_Latn", 1)]
    assert dec == [{"call": "decode", "n": 1, "target_lang": "fra_Latn", "max_seq_len": 256}] * 2
    assert "(2 concepts, stopped by repeat)" in p.stdout

class RunsCode:  # a pickle that runs a command when loaded without weights_only
    def __reduce__(self):
        return os.system, ("touch pwned",)

@pytest.mark.parametrize("case, message", [
    ("--start=", "the prompt is empty"),
    ("--out_dir=missing", "no checkpoint at missing/ckpt.pt"),
    ("--lang=french", "unknown language code 'french'"),
    ("--start=FILE:latin1.txt", "prompt file latin1.txt is not UTF-8"),
    ("--device=gpu", "--device=gpu is not a device"),
    ("truncated", "is not a readable baselcm checkpoint"),
    ("foreign", "is not a readable baselcm checkpoint"),
    ("runs code", "is not a readable baselcm checkpoint (UnpicklingError)"),
    ("no sonar",
     "cannot load 'cointegrated/SONAR_200_text_encoder' for the transformers port of SONAR"),
])
def test_sample_bad_input_gives_one_clear_line(case, message, tmp_path):
    save_checkpoint(tmp_path / "out", BaseLCM(tiny_config(d_emb=1024)), SONAR_DATA)
    ckpt = tmp_path / "out" / "ckpt.pt"
    if case == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:2000])
    if case == "foreign":
        torch.save({"state_dict": BaseLCM(tiny_config()).state_dict()}, ckpt)
    if case == "runs code":
        torch.save({"model": RunsCode()}, ckpt)
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 ouvert.".encode("latin-1"))
    p = run("sample.py", *[case] if case.startswith("--") else [], cwd=tmp_path, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    # hints name sample.py's own options
    assert "--encoder" not in p.stderr and not (tmp_path / "pwned").exists()

@pytest.fixture(scope="module")
def tiny_port(tmp_path_factory):
    """A randomly initialised port (M2M100, 1024 wide like SONAR) and a character-level NLLB
    tokenizer, saved where the port loads them from: no fairseq2, no download. -> the
    sample.py/train.py options that select it."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder
    root, chars = tmp_path_factory.mktemp("port"), sorted(set("abcdefghijklmnopqrstuvwxyzLRé.,'"))
    tok = NllbTokenizer(vocab={t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>",
                                                           "\u2581", *chars,
                                                              *("\u2581" + c for c in chars)])},
                        merges=[], extra_special_tokens=["eng_Latn", "fra_Latn", "deu_Latn"])
    config = M2M100Config(vocab_size=len(tok), d_model=1024, encoder_layers=1, decoder_layers=1,
                          encoder_ffn_dim=64,
                          decoder_ffn_dim=64, encoder_attention_heads=16,
                          decoder_attention_heads=16, scale_embedding=True,
                          max_position_embeddings=512, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2,
                          decoder_start_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    for name, model in (("encoder", M2M100Encoder(config)),
                        ("decoder", M2M100ForConditionalGeneration(config))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return [f"--sonar_hf_encoder={root / 'encoder'}", f"--sonar_hf_decoder={root / 'decoder'}"]

@pytest.mark.slow
def test_sonar_runs_through_its_transformers_port_without_sonar_space(tiny_port, tmp_path):
    french = ["Le feu a pris la nuit.", "La route est fermée.", "Les habitants sont partis.",
              "Il pleut enfin."]
    (tmp_path / "fr.txt").write_text("".join(" ".join(french[i % 4:] + french[:i % 4]) + "\n" for i in range(20)))
    p = run("embed.py", f"--dataset={tmp_path / 'fr.txt'}", "--encoder=sonar", "--lang=fra_Latn",
            "--val_fraction=0.2",
            tiny_port[0], cwd=tmp_path)  # no sonar-space here: the port
    assert "SONAR through its transformers port" in p.stdout
    d = read_dataset(tmp_path / "data" / "fr")
    assert d["meta"]["encoder"] == "sonar" and d["meta"]["impl"] == "transformers"
    assert d["meta"]["d_emb"] == 1024
    port = concepts.SonarPort("cpu", *(a.split("=", 1)[1] for a in tiny_port))
    rows, _, texts = d["train"]
    assert np.allclose(rows[:6].astype(np.float32),
                       port.encode(texts[:6], lang="fra_Latn"), atol=2e-2)
    run("train.py", "--dataset=fr", "--max_iters=2", "--eval_interval=2", *TRAIN[:-1], cwd=tmp_path)
    p = run("sample.py", "--start=Le feu a pris. La route est fermée.", "--lang=deu_Latn",
            "--max_new_concepts=2",
            "--stop_eot=2", "--json=True", *tiny_port, cwd=tmp_path)
    steps = json.loads(p.stdout.strip().splitlines()[-1])["steps"]
    assert len(steps) == 2 and all(isinstance(s["text"],
                                              str) and "retrieved_cos" not in s for s in steps)
    for args, message in ((["--lang=xyz_Latn", "--stop_eot=-1", *tiny_port],
                           "SONAR does not know the language 'xyz_Latn'"),
                          ([f"--sonar_hf_encoder={tmp_path / 'nowhere'}"],
                           "for the transformers port of SONAR")):
        p = run("sample.py", *args, cwd=tmp_path, check=False)
        assert p.returncode == 1 and message in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
