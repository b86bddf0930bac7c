# A Quant-LCM (quant.py): Quant-LCM-c by default, --model_type=quant_d for -d. The Two-Tower's network
# and dropout (config/train_diffusion.py), its noisy concept replaced by the partial sum of the first k - 1
# centroids, its timestep by the level; the codebooks fitted on the training concepts at the start. It
# trains until its own loss on the validation windows stops improving (patience): 100 epochs is a cap.
# $ python train.py config/train_quant.py                          # Lee, into out-quant
# $ python train.py config/train_quant.py --model_type=quant_d --out_dir=out-quant-d
model_type = "quant_c"
dropout = 0.1
epochs = 100
out_dir = "out-quant"
