"""Model classes built from fastbig.nn. Each takes ``fused=True`` (fastbig's fused layers) or
``fused=False`` (the same network in plain torch.nn, with identical state_dict keys)."""
from .cnn import BigModel, MNISTNet, SimpleCNN
from .dcgan import DCGAN, Discriminator, Generator
from .mlp import MLP, Autoencoder, WideDeep
from .resnet import BasicBlock, ResNet, resnet18, resnet34
from .sequence import LSTMClassifier, SelfAttentionClassifier
from .transformer import BertEncoder, Transformer

# The old name, kept for code that has it (fastbig.nn.SelfAttention is the layer; this is a classifier).
SelfAttention = SelfAttentionClassifier

__all__ = ["SimpleCNN", "BigModel", "MNISTNet", "MLP", "Autoencoder", "WideDeep", "LSTMClassifier",
           "SelfAttention", "SelfAttentionClassifier", "Transformer", "BertEncoder", "DCGAN",
           "Generator", "Discriminator", "ResNet", "BasicBlock", "resnet18", "resnet34"]
