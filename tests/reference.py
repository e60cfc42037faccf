"""The reference implementation (timm's CoaT) with random weights, for parity tests.

Every parameter is perturbed away from its initial value (LayerNorm scales and biases and class
tokens included), so that a weight the converter forgets or misplaces shows in the outputs.
"""

import numpy as np

import keras_coat
from keras_coat.convert import assign_state_dict


def timm_model(name, img_size=224, seed=0, **kwargs):
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=img_size, **kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def state_dict_numpy(torch_model):
    return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


def torch_forward(torch_model, images_nhwc):
    import torch

    with torch.no_grad():
        out = torch_model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
    if isinstance(out, dict):
        return {k: v.numpy().transpose(0, 2, 3, 1) for k, v in out.items()}
    return out.numpy()


def keras_twin(name, torch_model, input_shape=(224, 224, 3), **kwargs):
    """The keras_coat model of `name`, holding `torch_model`'s weights; outputs logits."""
    kwargs.setdefault("include_preprocessing", False)
    kwargs.setdefault("classifier_activation", None)
    model = keras_coat.create_model(name, input_shape=input_shape, **kwargs)
    assign_state_dict(model, state_dict_numpy(torch_model))
    return model


def random_images(batch, height, width, seed=0):
    """Normalized-looking inputs (the reference takes normalized images)."""
    return np.random.RandomState(seed).randn(batch, height, width, 3).astype("float32")
