# A laptop GPU (8-16 GB) or an Apple M-series Mac: d_model 1024, 8 layers (~100M parameters), bf16
# autocast, torch.compile.
# For a corpus of a few million sentences embedded with SONAR:
# $ python embed.py --dataset=wikimedia/wikipedia --hf_config=20231101.en --max_docs=200000 \
#       --encoder=sonar --name=wiki
# $ python train.py config/train_laptop_gpu.py
dataset = "wiki"
out_dir = "out-wiki"
block_size = 128          # paper: documents wrapped at 128 sentences
n_layer = 8
n_head = 16
n_embd = 1024
dropout = 0.1
batch_size = 16
gradient_accumulation_steps = 4
max_iters = 50000
eval_interval = 1000
log_interval = 50
warmup_iters = 2000
learning_rate = 4e-4
min_lr = 4e-5
dtype = ""                # auto: bf16 where the GPU has it, else fp16; fp32 on a Mac (README)
compile = True            # where it cannot work, train.py says so in one line and runs eager
always_save_checkpoint = True
