"""The attention Mask R-CNN of the iSAID report: EfficientNet-B0 with CBAM, an attention FPN, custom heads."""
