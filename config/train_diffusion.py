# The diffusion LCM (diffusion.py): the Two-Tower, the measured winner of the two (docs/results.md),
# with the paper's dropout, 0.1 (the Base-LCM's 0.3 cost it CA on Lee), and 80 epochs on Lee: its
# denoiser learns to read the context later than an MSE model does (20 epochs: conditional-mean CA
# 82.4 %, 80: 86.2 %, the Base-LCM's 85.8 %). A corpus 20x Lee's gets there in fewer: pass --epochs.
# $ python train.py config/train_diffusion.py                      # Lee, into out-diffusion
# $ python train.py config/train_diffusion.py --dataset=pyref --epochs=20 --out_dir=out-pyref-diffusion
model_type = "two_tower"
dropout = 0.1
epochs = 80
out_dir = "out-diffusion"
