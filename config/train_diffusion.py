# The diffusion LCM (diffusion.py): the Two-Tower, the measured winner of the two (docs/results.md),
# its denoiser attending to the context by relative position (denoiser_rope, a departure from the
# paper), with the paper's dropout, 0.1 (the Base-LCM's 0.3 cost it CA on Lee). It trains until its
# conditional mean's validation loss stops improving, as the Base-LCM does until its prediction's, but
# waits 8 evaluations, not 4: its CA swings between evaluations, and later bests came on web_long,
# pyref and kernel_long (docs/results.md). What it evaluates and keeps is a moving average of the
# weights (ema, a departure from the paper): the conditional mean's CA swung 1.5-3 points between
# evaluations, and the average holds it steady. 100 epochs is a cap that no corpus measured reached,
# not a length to guess.
# $ python train.py config/train_diffusion.py                      # Lee, into out-diffusion
# $ python train.py config/train_diffusion.py --dataset=mine --out_dir=out-mine-diffusion
model_type = "two_tower"
dropout = 0.1
epochs = 100
patience = 8
ema = 0.99
out_dir = "out-diffusion"
