"""
Continues a text sentence by sentence with a trained Base-LCM: the prompt is split and encoded with
the checkpoint's encoder, the model generates concepts, each decoded by SONAR or, for encoders
without a decoder (minilm), replaced by the nearest training sentence, whose concept joins the
context (--feedback); until the model says the text has ended.

$ python sample.py --start="The fire spread overnight. Residents were told to leave."
$ python sample.py --start=FILE:prompt.txt --num_samples=3 --noise=0.3
$ python sample.py --out_dir=out-sonar --start="The storm hit the coast." --lang=fra_Latn  # French
"""
import json as jsonlib, os, sys

import torch

from checkpoints import load_model
from common import (can_compile, check_trained_on, configure, get_device, read_text, require,
                    sampling_settings)
from concepts import SentenceBank, check_lang, decoder, load_encoder, sentence_splitter, split_sentences
from generation import STOP_END, STOP_EOT, STOP_REPEAT, Transcript, generate

out_dir = "out"          # holds ckpt.pt
start = "Hundreds of people have been forced to leave their homes as a bushfire moves towards the town."
                         # the prompt, or FILE:path
max_new_concepts = 16
stop_eot = STOP_EOT      # stop when cos(prediction, end of text) reaches this
stop_end = STOP_END      # stop when the text has ended by now with this probability (stop head); 0 = off
stop_repeat = STOP_REPEAT  # stop when a new concept is this close to one in the context; 0 = off
feedback = "decoded"     # the context takes the decoded sentence's concept; 'raw': the prediction
repeats = False          # retrieval may return a sentence of the prompt or of the sample again
noise = 0.0              # std of Gaussian noise in the normalized space: 0 = deterministic
num_samples = 1
seed = 1337
prompt_lang = ""         # FLORES-200 code of the prompt; '' = the training data's
lang = ""                # FLORES-200 code of the output (SONAR decoder); '' = prompt_lang
data_dir = ""            # sentence bank for retrieval; '' = the dataset the model was trained on
guidance = 0.0           # guidance scale, 1 = none; 0 = the model's own
ddim_steps = 0           # diffusion model: denoising steps; 0 = its default
init_noise = 0.0         # diffusion model: the scale of the noise it starts from; 0 = its default
temperature = 0.0        # Quant-LCM: sampling temperature; 0 = its default
top_k = 0                # Quant-LCM: a unit drawn among the top k; 0 = its default
compile = False          # torch.compile the model: the one-concept step compiles once (for GPUs)
sonar_hf_encoder = ""    # SONAR's transformers port, used without sonar-space: its encoder and
sonar_hf_decoder = ""    # decoder (hub names or folders); '' = the community port's (docs/sonar.md)
device = ""
json = False             # one JSON object per sample: each step's text, cosine to end of text, stop
configure(globals(), sys.argv[1:])

device = get_device(device)
model, ckpt = load_model(os.path.join(out_dir, "ckpt.pt"))
model.to(device).eval()
sampling = sampling_settings(model, out_dir, noise=noise, guidance=guidance, ddim_steps=ddim_steps,
                             init_noise=init_noise, temperature=temperature, top_k=top_k)
if compile and can_compile(device):
    model.compile()
data = ckpt["data"]
prompt_lang = prompt_lang or data["lang"]
lang = lang or prompt_lang
check_lang(prompt_lang, "--prompt_lang")
check_lang(lang)
start = read_text(start[5:], "prompt file") if start.startswith("FILE:") else start
prompt = split_sentences(sentence_splitter(data["spacy_model"]), [start], data["max_chars"])[0]
require(prompt, "the prompt is empty: pass --start='Some sentences.' or --start=FILE:prompt.txt")
# a model finetuned on pairs whose prompts closed with a sentence (embed.py --prompt_end) expects it
prompt += [data["prompt_end"]] if data.get("prompt_end") else []
since = 0 if data.get("pairs") else len(prompt)  # the text's sentences in it (pairs: the answer's)
enc = load_encoder(data["encoder"], device, (sonar_hf_encoder, sonar_hf_decoder))
require(enc.d_emb == model.config.d_emb, f"encoder {data['encoder']} gives d_emb {enc.d_emb}, "
        f"the model wants {model.config.d_emb}")
# SONAR decodes; otherwise the nearest sentence the encoder saw is retrieved, with its cosine
bank = None
if not enc.decode:
    bank = SentenceBank(data_dir or data["dir"])
    check_trained_on(bank.dir, bank.meta, data, "the checkpoint", "data_dir")
decode = decoder(enc, bank, lang, repeats)
require(feedback in ("decoded", "raw"), f"--feedback={feedback}: use decoded or raw")
concepts = torch.as_tensor(enc.encode(prompt, lang=prompt_lang), device=device)  # (T, d_emb)
eot = torch.tensor(data["eot"], device=device)
generator = torch.Generator(device=device).manual_seed(seed)

for k in range(num_samples):
    # each concept decoded as it comes (end of text is a signal, not a sentence)
    said = Transcript(decode, [prompt], feedback)
    [(_, cosines, reason)] = generate(model, [concepts], eot, max_new_concepts, said, [generator], since,
                                      stop_eot, stop_end, stop_repeat, **sampling)
    if json:
        steps = [{"text": t, "cos_eot": c} | ({"retrieved_cos": s} if s is not None else {})
                 for t, c, s in zip(said.texts[0], cosines, said.sims[0])]
        sample = {"sample": k, "prompt": prompt, "steps": steps, "stop": reason}
        print(jsonlib.dumps(sample, ensure_ascii=False))
        continue
    print("\n".join(prompt))
    for t, s in zip(said.texts[0], said.sims[0]):
        print(f"[retrieved, cos {s:.2f}] {t}" if s is not None else t)
    print(f"({len(said.texts[0])} concepts, stopped by {reason})\n---------------")
