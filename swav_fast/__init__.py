"""swav_fast: SwAV pretraining of torchvision ResNets, faithful to the official recipe, at hardware speed."""
