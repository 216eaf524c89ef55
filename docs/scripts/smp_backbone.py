"""A MixMIM encoder as the backbone of another library: segmentation_models_pytorch's U-Net through timm
(issue 23). Needs segmentation-models-pytorch, which mixmim does not depend on:

    pip install --target /tmp/smp --no-deps segmentation-models-pytorch
    PYTHONPATH=/tmp/smp python docs/scripts/smp_backbone.py

Prints smp's version, the U-Net's output shape, and whether the four maps its encoder hands the decoder
equal timm's ``features_only`` maps of the same export.
"""

import segmentation_models_pytorch as smp
import timm
import torch

import mixmim
from mixmim.interop.hub import save_hub_folder

torch.manual_seed(0)
save_hub_folder(mixmim.create_encoder("mixmim_tiny"), "/tmp/smp_export")  # what `mixmim export` writes
net = smp.Unet("tu-mixmim_tiny", encoder_weights=None, classes=5)
weights = timm.create_model("local-dir:/tmp/smp_export", pretrained=True).state_dict()
print(net.encoder.model.model.load_state_dict(weights, strict=False))  # only the final norm is left over
reference = timm.create_model("local-dir:/tmp/smp_export", pretrained=True, features_only=True).eval()
x = torch.randn(1, 3, 224, 224)
with torch.no_grad():
    maps = [f for f in net.encoder.eval()(x) if f.shape[1] > 3][-4:]  # smp adds the input as map 0
    print(smp.__version__, tuple(net.eval()(x).shape),
          [torch.allclose(a, b) for a, b in zip(maps, reference(x))])
