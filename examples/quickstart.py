"""Fine-tune the pretrained MNIST CNN on scikit-learn's digits with the lean bias+mask step."""
import numpy as np
import torch

import edgetl
from edgetl.datasets import load_dataset

pm = edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)
ds = load_dataset("digits", input_size=pm.input_size, channels=pm.in_channels)
mean, std = np.float32(pm.mean[0]), np.float32(pm.std[0])
xtr, xte = torch.from_numpy((ds.x_train - mean) / std), torch.from_numpy((ds.x_test - mean) / std)
ytr, yte = torch.from_numpy(ds.y_train), torch.from_numpy(ds.y_test)
opt = edgetl.OptimizerConfig.make("sgd", lr=0.05)
step = pm.step_module(opt)
params = pm.initial_params()
state = step.init_state(params)
g = torch.Generator().manual_seed(0)
for epoch in range(3):
    for idx in torch.randperm(len(xtr), generator=g).split(32):
        loss, _, params, state, _ = step.run(xtr[idx], ytr[idx], opt.lr, params, state)
    print(f"epoch {epoch + 1}: loss {float(loss):.3f}")
from edgetl.step import LeanEval

acc = (LeanEval(pm)(xte, *params.values()).argmax(1) == yte).float().mean()
print(f"test accuracy {100 * float(acc):.1f}%  trainable {pm.summary()['trainable_fraction']:.2%}  "
      f"analytic peak {pm.memory(32).analytic_peak_bytes / 2**20:.1f} MB")
