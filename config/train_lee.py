# The offline default, spelled out: a 3.4M-parameter Base-LCM on gensim's Lee news corpus (MiniLM
# concepts). Trains in about 11 s on 2 CPU cores (bf16 where the CPU is faster in it).
# $ python embed.py && python train.py config/train_lee.py
dataset = "lee"
block_size = 16
n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.3
batch_size = 32
max_iters = 0             # 0: `epochs` passes over the training concepts (106 iterations on Lee)
epochs = 20.0
patience = 4              # evaluations without a better val loss before stopping
eval_interval = 25
warmup_iters = 20
learning_rate = 4e-4
always_save_checkpoint = False
