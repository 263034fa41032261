"""Point-supervised semantic segmentation: a ResNet-18 encoder, a transposed-conv decoder, partial CE."""
