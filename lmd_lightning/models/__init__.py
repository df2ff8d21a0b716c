"""Reference LightningModules for the Hydra recipes: an MLP, a 1-D CNN, a transformer and ResNet-18.

Every model is a `Classifier`: cross-entropy, accuracy, optimizers built from factories on
each `configure_optimizers` call, and hyper-parameters stored as plain Python values so that
compressed checkpoints load with `lmd_lightning.load_compressed`.
"""

from lmd_lightning.models.classifier import Classifier
from lmd_lightning.models.cnn import CNN1DClassifier
from lmd_lightning.models.mlp import MLPClassifier
from lmd_lightning.models.resnet import ResNetClassifier
from lmd_lightning.models.transformer import TransformerClassifier

__all__ = ["CNN1DClassifier", "Classifier", "MLPClassifier", "ResNetClassifier", "TransformerClassifier"]
