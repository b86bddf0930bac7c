# The diffusion LCM (diffusion.py): the Base-LCM's defaults, but for the model and its dropout, the
# paper's 0.1 (the Base-LCM's 0.3 is for small corpora; diffusion's noise regularises it already: on
# Lee 0.3 cost 1.4 points of CA, on pyref it was level: docs/results.md).
# $ python train.py config/train_diffusion.py                      # Lee, into out-diffusion
# $ python train.py config/train_diffusion.py --dataset=pyref --out_dir=out-pyref-diffusion
model_type = "diffusion"
dropout = 0.1
out_dir = "out-diffusion"
